import subprocess
import sys

import yaml


def run(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "megalm.train", *args], capture_output=True, text=True, env=env
    )


def test_print_config_prints_resolved_yaml():
    r = run("--config", "configs/tiny.yaml", "--print-config", "train.steps=7")
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    assert cfg["train"]["steps"] == 7
    assert cfg["train"]["grad_accum_steps"] == 1  # derived values are resolved


def test_bad_config_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden: 3\n")
    for args in (["--config", str(bad)], ["--config", "nope.yaml"], ["--config", "configs/tiny.yaml", "zero.stage=9"]):
        r = run(*args, "--print-config")
        assert r.returncode == 2
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        assert "Traceback" not in r.stderr


def test_world_size_from_launcher_env():
    import os

    env = dict(os.environ, RANK="0", WORLD_SIZE="4", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    r = run("--config", "configs/tiny.yaml", "--print-config", "parallel.tensor=2", env=env)
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["train"]["global_batch_size"] == 8  # micro 4 x dp 2


def test_import_has_no_side_effects():
    code = (
        "import sys, megalm, megalm.config, megalm.parallel.launch_env, megalm.parallel.dims;"
        "bad=[m for m in sys.modules if m.startswith(('deepspeed','torch'))];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_preflight_checks_world_against_dims():
    ok = subprocess.run([sys.executable, "-m", "megalm.cli.preflight", "--config", "configs/tiny.yaml",
                         "--world-size", "8", "parallel.tensor=2"], capture_output=True, text=True)
    assert ok.returncode == 0 and "world 8 = tensor 2 x pipeline 1 x data 4" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "megalm.cli.preflight", "--config", "configs/tiny.yaml",
                          "--world-size", "3", "parallel.tensor=2"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("error: world size 3 is not divisible by tensor x pipeline = 2 x 1 = 2; "
                                  "launch a multiple of 2 processes or change parallel.tensor/pipeline")


def test_rendezvous_timeout_is_one_clear_error():
    import pytest

    from megalm.errors import MegalmError
    from megalm.parallel.groups import wait_for_rendezvous
    from megalm.testing.distributed import free_port

    with pytest.raises(MegalmError, match="cannot reach the rendezvous at 127.0.0.1"):
        wait_for_rendezvous("127.0.0.1", free_port(), timeout_s=1.0)


def test_console_scripts_cover_every_tool_and_exit_2_on_user_errors():
    from importlib.metadata import entry_points
    from pathlib import Path

    from megalm.cli import entry

    # the installed console scripts (from setup.py) are exactly megalm-train + one per megalm/cli module
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts") if ep.value.startswith("megalm.")}
    expected = {f"megalm-{t.replace('_', '-')}": f"megalm.cli.entry:{t}" for t in entry.tools()}
    assert scripts == {"megalm-train": "megalm.cli.entry:train", **expected}
    assert len(entry.tools()) >= 12 and {"generate", "quickstart", "preflight"} <= set(entry.tools())
    assert all(callable(getattr(entry, t)) for t in entry.tools())
    assert sorted(p.stem for p in Path("tools").glob("*.py")) == entry.tools()
    r = subprocess.run([sys.executable, "-c", "from megalm.cli.entry import train; train()",
                        "--config", "nope.yaml"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "error: config file not found: nope.yaml"


EXIT_SCRIPT = """
import atexit, sys
import torch, torch.distributed as dist
from megalm.errors import MegalmError, run_cli

class Finalized:
    def __del__(self):
        print("finalized", flush=True)  # runs only in the interpreter's teardown

KEEP = Finalized()
atexit.register(lambda: print("exit handler", flush=True))
if sys.argv[2] != "alone":
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=0, world_size=1)
    dist.all_reduce(torch.ones(2))

def main():
    if sys.argv[1] == "fail":
        raise MegalmError("bad input")
    return int(sys.argv[1])

run_cli(main)
"""


def test_distributed_rank_exits_without_interpreter_teardown(tmp_path):
    """A rank of a distributed job runs the exit handlers, keeps its exit code and its one error line,
    then ends without the interpreter's teardown (where gloo's threads could abort it with exit 134)."""
    from megalm.parallel.spawn import free_port

    script = tmp_path / "rank.py"
    script.write_text(EXIT_SCRIPT)
    for arg, code in (("0", 0), ("3", 3), ("fail", 2)):
        r = subprocess.run([sys.executable, str(script), arg, str(free_port())], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == code, r.stderr
        assert "exit handler" in r.stdout and "finalized" not in r.stdout, r.stdout
        if arg == "fail":
            assert r.stderr.strip().splitlines()[-1] == "error: bad input", r.stderr
    r = subprocess.run([sys.executable, str(script), "0", "alone"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "finalized" in r.stdout, r.stdout + r.stderr  # a single process exits normally
