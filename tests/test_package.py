"""The package layout and the lean device side."""

import subprocess
import sys

import pytest

from nonn.cli import main


def test_subpackages_map_to_top_level_folders():
    import nonn.deploy
    import nonn.devices
    import nonn.partition
    import nonn.runtime
    import nonn.students

    for mod, folder in [
        (nonn.partition, "partition"),
        (nonn.students, "students"),
        (nonn.runtime, "runtime"),
        (nonn.devices, "devices"),
        (nonn.deploy, "deploy"),
    ]:
        assert mod.__file__.replace("\\", "/").split("/")[-2] == folder


def test_runtime_devices_and_deploy_import_without_torch():
    # torch set to None in sys.modules makes any `import torch` raise ImportError.
    code = (
        "import sys, pkgutil, importlib\n"
        "sys.modules['torch'] = None\n"
        "import nonn.runtime, nonn.devices, nonn.deploy\n"
        "for pkg in (nonn.runtime, nonn.devices, nonn.deploy):\n"
        "    for info in pkgutil.iter_modules(pkg.__path__):\n"
        "        importlib.import_module(pkg.__name__ + '.' + info.name)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_cli_help_lists_pipeline(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "nonn partition" in capsys.readouterr().out


def test_atomic_artifacts_get_ordinary_permissions(tmp_path):
    import os

    from nonn.artifacts import atomic_directory, atomic_write_text

    mask = os.umask(0o022)
    try:
        f = atomic_write_text(tmp_path / "a.json", "{}")
        with atomic_directory(tmp_path / "bundle") as d:
            (d / "x").write_text("x")
    finally:
        os.umask(mask)
    assert (f.stat().st_mode & 0o777) == 0o644
    assert ((tmp_path / "bundle").stat().st_mode & 0o777) == 0o755


def test_atomic_directory_failure_keeps_previous(tmp_path):
    from nonn.artifacts import atomic_directory

    dest = tmp_path / "bundle"
    with atomic_directory(dest) as d:
        (d / "old").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_directory(dest) as d:
            (d / "new").write_text("2")
            raise RuntimeError("boom")
    assert sorted(p.name for p in dest.iterdir()) == ["old"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_exchange_paths_swaps_two_directories_in_one_step(tmp_path):
    from nonn.artifacts import exchange_paths

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "from_a").write_text("a")
    (b / "from_b").write_text("b")
    if not exchange_paths(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    assert [p.name for p in a.iterdir()] == ["from_b"]
    assert [p.name for p in b.iterdir()] == ["from_a"]


def test_atomic_directory_replaces_an_existing_bundle_whole(tmp_path):
    from nonn.artifacts import atomic_directory

    dest = tmp_path / "bundle"
    for version in ("1", "2"):
        with atomic_directory(dest) as d:
            (d / f"v{version}").write_text(version)
    assert [p.name for p in dest.iterdir()] == ["v2"]
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_cli_defaults_match_the_runtime():
    """The CLI builds its parser without importing grpc, so it repeats these: keep them equal."""
    from nonn.cli import common
    from nonn.cli import runtime as cli_runtime
    from nonn.runtime import device_client, servicer

    assert cli_runtime.DEFAULT_MAX_STREAMS == servicer.DEFAULT_MAX_STREAMS
    assert common.TRANSPORTS == device_client.TRANSPORTS


def test_a_failing_tritonclient_client_raises_its_own_error_every_time():
    """The device side loads tritonclient's stubs without its client; when the client's import
    later fails, each use names the real cause, not a puzzling missing attribute."""
    code = (
        "import sys\n"
        "import nonn.runtime.protocol\n"
        "sys.modules['numpy'] = None  # the client needs numpy: its import now fails\n"
        "import tritonclient.grpc as client\n"
        "for _ in range(3):\n"
        "    try:\n"
        "        client.InferenceServerClient\n"
        "    except Exception as exc:\n"
        "        print(type(exc).__name__, exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    lines = out.stdout.splitlines()
    assert out.returncode == 0 and len(lines) == 3, out.stderr
    assert len(set(lines)) == 1 and "AttributeError" not in lines[0], lines


def test_setup_cfg_floors_match_the_floors_constraints():
    """`make test-floors` installs constraints/floors.txt: it must pin each stated floor, and only those."""
    import configparser
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(root / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines()
    lines += [line for name in cfg["options.extras_require"] if name != "all" for line in cfg["options.extras_require"][name].splitlines()]
    stated = {}
    for line in filter(None, (line.strip() for line in lines)):
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[a-z,]+\])?>=([0-9.]+)", line)
        assert match, f"setup.cfg requirement {line!r}: expected NAME>=FLOOR"
        floor = stated.setdefault(match[1].lower(), match[2])
        assert floor == match[2], f"setup.cfg states two floors for {match[1]}: {floor} and {match[2]}"
    pinned = {}
    for line in (root / "constraints" / "floors.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pinned[name.strip().lower()] = version.strip()
    assert pinned == stated
