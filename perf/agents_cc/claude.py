"""Claude Code, the real client, run non-interactively against a base URL.

The binary comes from npm (`@anthropic-ai/claude-code`, whose Linux build ships inside a registry
package) installed outside the repository: `make test-setup` puts it under TOOLS_DIR. Each run gets
a throw-away HOME, no telemetry and no traffic but to the base URL.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

VERSION = "2.1.328"
TOOLS_DIR = Path(os.environ.get("AGENT_TOOLS_DIR", Path.home() / ".cache" / "semcache-tools"))
INSTALL = (f"npm install --prefix {TOOLS_DIR / 'claude-code'} @anthropic-ai/claude-code@{VERSION}"
           "   (or: make test-setup)")


def binary() -> Path:
    """The installed `claude`, or FileNotFoundError saying how to install it."""
    path = TOOLS_DIR / "claude-code" / "node_modules" / ".bin" / "claude"
    if not path.exists():
        hint = "" if shutil.which("npm") else " (npm is missing too: apt-get install npm)"
        raise FileNotFoundError(f"Claude Code {VERSION} is not installed; run: {INSTALL}{hint}")
    return path


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def environment(base_url: str, home: Path, max_output: int) -> dict[str, str]:
    """The environment Claude Code runs in (the CLI here, or under the Claude Agent SDK): this
    process's, less any ANTHROPIC_/CLAUDE_ setting, pointed at `base_url` with a throw-away HOME,
    no telemetry or other traffic, and replies capped at `max_output` tokens."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CLAUDE_"))}
    return env | {"HOME": str(home), "ANTHROPIC_BASE_URL": base_url, "ANTHROPIC_API_KEY": "semcache-local",
                  "DISABLE_TELEMETRY": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
                  "DISABLE_AUTOUPDATER": "1", "CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(max_output)}


def run(base_url: str, home: Path, args: list[str], max_output: int = 64, timeout: float = 900,
        cwd: Path | None = None) -> Result:
    """`claude -p ...` against `base_url`. CLAUDE_CODE_MAX_OUTPUT_TOKENS caps each reply, since a
    small local model may never stop on its own (Claude Code asks for 32,000 tokens)."""
    home.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([str(binary()), *args], capture_output=True, text=True, timeout=timeout,
                          env=environment(base_url, home, max_output), cwd=cwd or home, stdin=subprocess.DEVNULL)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def bare(prompt: str, session: str, resume: bool) -> list[str]:
    """A `--bare` turn with only the Read tool: a request small enough for an 8K-context model."""
    flag = ["--resume", session] if resume else ["--session-id", session]
    return ["-p", prompt, "--model", "local", "--bare", "--tools", "Read", *flag]
