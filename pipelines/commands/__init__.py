"""What each `p2p` command does once pipelines/cli.py parsed its arguments; one module per group of commands,
so a command loads only the libraries it uses."""
