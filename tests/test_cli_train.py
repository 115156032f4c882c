"""`clipkit train`: typos stop before work; --dry-run prints the plan and the memory estimate."""

from pathlib import Path

from clipkit.cli.main import main

RECIPE = str(Path(__file__).parents[1] / "train" / "tiny_openclip.yaml")


def test_typo_in_override_exits_2_naming_the_key(capsys):
    assert main(["train", RECIPE, "train.sampels=10"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.sampels'; did you mean 'train.samples'" in err


def test_dry_run_prints_config_and_memory_estimate(capsys):
    assert main(["train", RECIPE, "data.batch_size=16", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "batch_size: 16" in out
    assert "predicted peak memory per device" in out and "batch 16 x 1 rank(s)" in out


def run_cli(*argv: str):
    """``cli()`` in a fresh process: (its exit code, what main() saw: collector on, start-up
    frozen, the training loop imported; the collector after) and stderr."""
    import subprocess
    import sys

    code = (
        "import gc, sys\n"
        "from clipkit.cli import main as m\n"
        "calls, real = [], m.main\n"
        "m.main = lambda argv: calls.append((gc.isenabled(), gc.get_freeze_count() > 0, "
        "'clipkit.training.loop' in sys.modules)) or real(argv)\n"
        f"sys.argv = ['clipkit', *{list(argv)!r}]\n"
        "try:\n    rc = m.cli()\nexcept SystemExit as e:\n    rc = e.code\n"
        "print(rc, calls, gc.isenabled())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1], out.stderr


def test_console_script_preloads_with_the_collector_paused_and_leaves_it_on():
    # `clipkit` is cli(): heavy imports with the cyclic collector paused, start-up objects frozen,
    # then main() with the collector on; its exit code is main's.
    said, err = run_cli("train", RECIPE, "train.sampels=10")
    assert said == "2 [(True, True, True)] True", err
    assert "unknown config key 'train.sampels'" in err
    said, _ = run_cli("train", "--help")  # help: nothing heavy imported first
    assert said == "0 [(True, True, False)] True"


def test_console_script_preload_skips_timms_optional_wandb_import_and_leaves_wandb_importable():
    # timm imports wandb (when installed) for a logger clipkit never calls: 0.3-0.4 s of start-up.
    import subprocess
    import sys

    import wandb  # noqa: F401 - installed with the test extras: the case being tested

    code = (
        "import sys\n"
        "from clipkit.cli import main as m\n"
        f"sys.argv = ['clipkit', 'train', {str(RECIPE)!r}, 'train.sampels=10']\n"
        "rc = m.cli()\n"
        "import timm.utils.summary as summary\n"
        "during = 'wandb' in sys.modules\n"
        "import wandb\n"
        "print(rc, 'timm' in sys.modules, hasattr(summary, 'wandb'), during, wandb.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # preloaded (timm imported) without wandb; the config error exits 2; wandb imports after
    assert out.stdout.strip().splitlines()[-1] == "2 True False False wandb", out.stdout + out.stderr


def test_console_script_leaves_the_process_group_after_a_clean_command_and_only_then():
    # Under torchrun each rank's `clipkit` ends its process group itself: after a clean command
    # the ranks meet at a barrier and then destroy the group; after a failed one nothing waits
    # for peers that may never come. A 1-rank gloo group stands in for the launcher's.
    import subprocess
    import sys

    from dist_helpers import free_port

    code = (
        "import sys\n"
        "import torch.distributed as dist\n"
        "from clipkit.cli import main as m\n"
        "calls, barrier, destroy = [], dist.barrier, dist.destroy_process_group\n"
        "dist.barrier = lambda *a, **k: calls.append('barrier') or barrier(*a, **k)\n"
        "dist.destroy_process_group = lambda *a, **k: calls.append('destroy') or destroy(*a, **k)\n"
        "def command(rc, port):\n"
        "    dist.init_process_group('gloo', rank=0, world_size=1, init_method=f'tcp://127.0.0.1:{port}')\n"
        "    m.main = lambda argv: rc\n"
        "    sys.argv = ['clipkit', 'train', '--help']\n"
        "    return [m.cli(), list(calls), dist.is_initialized()]\n"
        "ports = sys.argv[1:]\n"
        "failed = command(3, ports[0])\n"
        "destroy()\n"
        "print(failed, command(0, ports[1]))\n"
    )
    argv = [sys.executable, "-c", code, str(free_port()), str(free_port())]
    out = subprocess.run(argv, check=False, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    said = out.stdout.strip().splitlines()[-1]
    assert said == "[3, [], True] [0, ['barrier', 'destroy'], False]", out.stdout + out.stderr


def test_index_sets_the_openmp_wait_policy_before_torch_is_loaded(tmp_path):
    # OpenMP reads OMP_WAIT_POLICY when its runtime loads (with torch), and Hugging Face reads
    # HF_HUB_OFFLINE when it is imported: the console script's preload must come after both are set.
    import subprocess
    import sys

    code = (
        "import os, sys\n"
        "seen = []\n"
        "class Spy:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name in ('torch', 'transformers'):\n"
        "            seen.append((name, os.environ.get('OMP_WAIT_POLICY'), os.environ.get('HF_HUB_OFFLINE')))\n"
        "        return None\n"
        "sys.meta_path.insert(0, Spy())\n"
        "from clipkit.cli import main as m\n"
        f"sys.argv = ['clipkit', 'index', 'search', {str(tmp_path / 'missing')!r}, 'a cat']\n"
        "try:\n    rc = m.cli()\nexcept SystemExit as e:\n    rc = e.code\n"
        "print(sorted(set(seen)))\n"
    )
    drop = ("OMP_WAIT_POLICY", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    env = {k: v for k, v in __import__("os").environ.items() if k not in drop}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    # transformers (through open_clip) reads HF_HUB_OFFLINE when it is imported: offline already
    want = "[('torch', 'PASSIVE', '1'), ('transformers', 'PASSIVE', '1')]"
    assert out.stdout.strip().splitlines()[-1] == want, out.stdout + out.stderr


def test_console_script_builds_an_index_without_importing_torch(tmp_path):
    # `index build` and `index merge` load no model: preloading torch there cost `index build`
    # 5.7 s and 0.8 GiB of peak RSS. `index query` loads one, and is preloaded.
    import subprocess
    import sys

    from index_helpers import clustered, write_vectors

    from clipkit.cli.main import preloaded_modules

    write_vectors(tmp_path / "emb", clustered(600, 16, seed=3), part_rows=300)
    code = (
        "import sys\n"
        "from clipkit.cli import main as m\n"
        f"sys.argv = ['clipkit', 'index', 'build', {str(tmp_path / 'emb')!r}, '--out', "
        f"{str(tmp_path / 'idx')!r}, '--memory', '16MB', '--threads', '1']\n"
        "rc = m.cli()\n"
        "print(rc, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "0 False", out.stdout + out.stderr
    assert (tmp_path / "idx" / "index.faiss").is_file()
    assert preloaded_modules(["index", "merge", "a", "b", "--out", "c"]) == ()
    assert preloaded_modules(["index", "query", "idx", "--text", "a cat"]) == ("clipkit.models",)
    assert preloaded_modules(["index", "build", "--help"]) == preloaded_modules([]) == ()
