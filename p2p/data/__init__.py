"""User data: Parquet contracts, the synthetic benchmark and the LaMP importer."""
