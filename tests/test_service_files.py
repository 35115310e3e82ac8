"""The service definitions in systemd/: a systemd unit and a launchd plist that run `semcache serve`.

Static checks only (plus `systemd-analyze verify` where it exists): nothing is installed or started.
"""

from __future__ import annotations

import configparser
import plistlib
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "semcache.service"
PLIST = ROOT / "systemd" / "com.semcache.plist"
README = ROOT / "systemd" / "README.md"

# Seconds after the drain for writing the in-memory cache entries before the SIGKILL.
CACHE_WRITE_MARGIN = 10


def default_drain_timeout() -> float:
    """Config().drain_timeout, or 30 s (the documented default) where the field does not exist."""
    from semcache.ops.config import Config

    return float(getattr(Config(), "drain_timeout", 30.0))


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """{section: {key: [values in order]}}: systemd allows a key more than once (Environment=)
    and an empty assignment resets a list, so every value is kept; `\\` continues a line."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"assignment outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def time_span(value: str) -> float:
    """Seconds in a systemd time span: '45', '45s', '1min 30s', '2m', '1h'."""
    units = {"": 1, "s": 1, "sec": 1, "second": 1, "seconds": 1, "m": 60, "min": 60,
             "minute": 60, "minutes": 60, "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600,
             "ms": 0.001, "msec": 0.001, "us": 1e-6, "usec": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value.strip().lower())
    assert parts and all(unit in units for _, unit in parts), f"not a time span: {value!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT.read_text())


@pytest.fixture(scope="module")
def service(unit) -> dict[str, str]:
    """[Service] with the last value of each key (what systemd uses for single-valued keys)."""
    return {key: values[-1] for key, values in unit["Service"].items()}


@pytest.fixture(scope="module")
def plist() -> dict:
    with PLIST.open("rb") as f:
        return plistlib.load(f)


def exec_start_argv(service: dict[str, str]) -> list[str]:
    return shlex.split(service["ExecStart"].lstrip("-@:+!"))


def flag_value(argv: list[str], flag: str) -> str:
    for i, arg in enumerate(argv):
        if arg == flag:
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{flag} missing from {argv}")


# --- launchd plist -------------------------------------------------------------------------


def test_plist_is_well_formed_with_label(plist):
    """The plist parses with plistlib and its Label is com.semcache."""
    assert plist["Label"] == "com.semcache"


def test_plist_runs_semcache_serve_with_config(plist):
    """ProgramArguments is a list of strings: an absolute semcache path, `serve`, `--config FILE`."""
    args = plist["ProgramArguments"]
    assert isinstance(args, list) and all(isinstance(a, str) for a in args)
    assert args[0].startswith("/") and Path(args[0]).name == "semcache"  # launchd does not search PATH
    assert "serve" in args
    assert flag_value(args, "--config").endswith(".toml")


def test_plist_starts_at_load(plist):
    """RunAtLoad is true, so the job starts when it is bootstrapped (login or boot)."""
    assert plist["RunAtLoad"] is True


def test_plist_keepalive_restarts_failures_only(plist):
    """KeepAlive is set: true, or a dict whose SuccessfulExit is false (a drained exit 0 stays stopped)."""
    keep = plist["KeepAlive"]
    assert keep is True or (isinstance(keep, dict) and keep.get("SuccessfulExit") is False)


def test_plist_exit_timeout_exceeds_drain(plist):
    """ExitTimeOut exceeds 30 s and the default drain_timeout plus time to write the caches."""
    timeout = plist["ExitTimeOut"]
    assert isinstance(timeout, int) and timeout > 30
    assert timeout >= default_drain_timeout() + CACHE_WRITE_MARGIN


def test_plist_logs_unbuffered_to_one_file(plist):
    """PYTHONUNBUFFERED=1 is set and stdout/stderr go to /usr/local/var/log/semcache.log."""
    assert plist["EnvironmentVariables"]["PYTHONUNBUFFERED"] == "1"
    assert plist["StandardOutPath"] == plist["StandardErrorPath"] == "/usr/local/var/log/semcache.log"
    assert plist["ProcessType"] in ("Interactive", "Standard")


# --- systemd unit --------------------------------------------------------------------------


def test_unit_parses_into_three_sections(unit):
    """The unit has [Unit], [Service] and [Install], and configparser (strict=False) also reads it."""
    assert {"Unit", "Service", "Install"} <= set(unit)
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(UNIT.read_text())
    assert parser["Service"]["TimeoutStopSec"] == unit["Service"]["TimeoutStopSec"][-1]


def test_unit_runs_semcache_serve_with_config_and_cache_dir(service):
    """ExecStart runs an absolute semcache path with `serve --config /etc/semcache/semcache.toml --cache-dir DIR`."""
    argv = exec_start_argv(service)
    assert argv[0].startswith("/") and Path(argv[0]).name == "semcache"
    assert argv[1] == "serve"
    assert flag_value(argv, "--config") == "/etc/semcache/semcache.toml"
    assert flag_value(argv, "--cache-dir") == "/var/lib/semcache"
    assert service["Type"] in ("exec", "simple")


def test_unit_cache_dir_is_writable_state_directory(unit, service):
    """The --cache-dir in ExecStart is listed in ReadWritePaths and is the StateDirectory (/var/lib/<name>)."""
    cache_dir = flag_value(exec_start_argv(service), "--cache-dir")
    writable = {p.lstrip("-+") for v in unit["Service"]["ReadWritePaths"] for p in v.split()}
    assert cache_dir in writable
    state = {"/var/lib/" + d.split(":")[0] for v in unit["Service"]["StateDirectory"] for d in v.split()}
    assert cache_dir in state


def test_unit_hardening(service):
    """The sandbox keys are on (NoNewPrivileges, ProtectSystem=strict, ...) and MemoryDenyWriteExecute is not."""
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
    }
    assert {k: service.get(k) for k in expected} == expected
    assert service.get("ProtectHome") in ("yes", "read-only")
    assert "MemoryDenyWriteExecute" not in service  # breaks JIT / BLAS code generation
    assert service.get("User") or service.get("DynamicUser") == "yes"


def test_unit_restarts_on_failure(service):
    """Restart=on-failure with RestartSec=2: crashes restart, a clean drained stop does not."""
    assert service["Restart"] == "on-failure"
    assert time_span(service["RestartSec"]) == 2


def test_unit_stop_timeout_exceeds_drain(service):
    """SIGTERM stops it and TimeoutStopSec exceeds 30 s and the default drain_timeout plus time to write caches."""
    assert service.get("KillSignal", "SIGTERM") in ("SIGTERM", "TERM", "15")
    timeout = time_span(service["TimeoutStopSec"])
    assert timeout > 30
    assert timeout >= default_drain_timeout() + CACHE_WRITE_MARGIN


def test_stop_timeouts_are_the_daemons_stop_budget(service, plist):
    """Both stop timeouts are the longest a stop takes with the default drain_timeout and
    cache_close_timeout, as the daemon bounds it (drain, the graces after it, the cache write-out),
    plus a margin of at least STOP_MARGIN: a SIGKILL never lands before the caches are written."""
    from semcache.ops.config import Config
    from semcache.service.lifecycle import STOP_MARGIN, stop_seconds

    budget = stop_seconds(default_drain_timeout(), Config().cache_close_timeout)
    timeout = time_span(service["TimeoutStopSec"])
    assert timeout == plist["ExitTimeOut"] and budget + STOP_MARGIN <= timeout <= budget + 2 * STOP_MARGIN
    raise_by = round(timeout - default_drain_timeout())
    rule = rf"drain_timeout\W[^+\n]*\+ {raise_by}\b"  # what each file tells one who raises it
    for path in (UNIT, PLIST, README, ROOT / "config" / "semcache.toml"):
        assert re.search(rule, path.read_text()), path


def test_stop_timeouts_agree(service, plist):
    """The unit's TimeoutStopSec equals the plist's ExitTimeOut: the same drain budget on Linux and macOS."""
    assert time_span(service["TimeoutStopSec"]) == plist["ExitTimeOut"]


def test_unit_reload_sends_hup_to_main_pid(service):
    """ExecReload sends SIGHUP to $MAINPID (the daemon re-reads its API keys file)."""
    argv = shlex.split(service["ExecReload"])
    assert Path(argv[0]).name == "kill"
    assert {"-HUP", "-SIGHUP", "-1"} & set(argv) or ("-s" in argv and argv[argv.index("-s") + 1] in ("HUP", "SIGHUP"))
    assert argv[-1] in ("$MAINPID", "${MAINPID}")


def test_unit_environment_and_limits(unit, service):
    """PYTHONUNBUFFERED=1 is in the environment, LimitNOFILE=65536, and it is wanted by multi-user.target."""
    env = dict(a.split("=", 1) for v in unit["Service"].get("Environment", []) for a in shlex.split(v))
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert service["LimitNOFILE"] == "65536"
    assert "multi-user.target" in " ".join(unit["Install"]["WantedBy"]).split()


def test_readme_documents_install_and_signals():
    """systemd/README.md covers install (daemon-reload, enable --now, launchctl bootstrap/bootout), drain and SIGHUP."""
    text = README.read_text()
    for needle in ("/etc/systemd/system", "systemctl daemon-reload", "enable --now", "journalctl",
                   "launchctl bootstrap", "launchctl bootout", "SIGTERM", "drain_timeout", "SIGHUP",
                   "systemctl reload", "/var/lib/semcache", "KeepAlive", "ProcessType"):
        assert needle in text, needle


# --- systemd-analyze -----------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed: `make test` installs it as root, else run `sudo apt-get install systemd`")
def test_systemd_analyze_verify(tmp_path, service):
    """`systemd-analyze verify` reports nothing about the unit (ExecStart pointed at this machine's semcache if needed)."""
    unit_file = UNIT
    program = exec_start_argv(service)[0]
    if not Path(program).exists():
        # verify checks that ExecStart's program exists; this machine's semcache lives elsewhere.
        found = shutil.which("semcache")
        replacement = shlex.quote(found) if found else f"{shlex.quote(sys.executable)} -m semcache"
        text = UNIT.read_text()
        assert text.count(f"ExecStart={program} ") == 1
        unit_file = tmp_path / UNIT.name
        unit_file.write_text(text.replace(f"ExecStart={program} ", f"ExecStart={replacement} "))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit_file)],
        check=False, capture_output=True, text=True, timeout=60,
    )
    # verify exits 0 even for unknown keys and unparsable values, so its messages count too;
    # messages about other units on this machine do not.
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if UNIT.name in line or str(unit_file) in line]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr
