"""`make gpu-check` in CPU test mode, with the packages a bare GPU image lacks made unimportable."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ABSENT = ("ray", "deepspeed", "pydantic", "fastapi", "s3fs", "sentence_transformers", "pyarrow", "p2p.fs")
# None in sys.modules: `import x` fails and importlib.util.find_spec("x") says "not installed", as on the image.
BLOCKER = f"""
import runpy, sys
sys.modules.update(dict.fromkeys({ABSENT!r}))
sys.argv = ["gpu_check", "--tiny", "--device", "cpu", "--out", sys.argv[1]]
runpy.run_module("bench.gpu_check", run_name="__main__")
"""


def test_gpu_check_runs_on_torch_transformers_and_peft_alone(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, "-c", BLOCKER, str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, PYTHONPATH=ROOT))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "| check | result | ok |" in done.stdout and "5/5 checks pass" in done.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {r["check"].split(",")[0] for r in rows} >= {"hypernet training", "adapter generation"}
    export = [r for r in rows if r["check"].startswith("export")]
    assert len(export) == 2 and all(r["adapter_effect"] > 1e-2 for r in export)
    assert export[1]["bytes"] < 0.6 * export[0]["bytes"]  # bf16 halves the weights
