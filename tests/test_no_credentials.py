"""No AWS credentials in the repository: every tracked or untracked-but-not-ignored text
file is scanned for access key ids and secret access key assignments."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ACCESS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
SECRET_ASSIGNMENT = re.compile(
    r"(?i)(?:aws_?secret_?access_?key|secret_?access_?key|secretaccesskey)"
    r"[\"']?\s*[:=]\s*[\"']?([A-Za-z0-9/+=]{40})(?![A-Za-z0-9/+=])"
)


def repository_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout  # fmt: skip
    names = sorted({name for name in listed.decode().split("\0") if name})
    return [ROOT / name for name in names if (ROOT / name).is_file()]


def text_of(path: Path) -> str | None:
    data = path.read_bytes()[:5_000_000]
    if b"\0" in data[:8192]:
        return None  # binary
    return data.decode("utf-8", errors="replace")


def findings(text: str) -> list[str]:
    return [m.group(0) for m in ACCESS_KEY_ID.finditer(text)] + [
        m.group(0) for m in SECRET_ASSIGNMENT.finditer(text)
    ]


def test_patterns_catch_credentials():
    key_id = "AKIA" + "Q" * 16  # built at run time so this file stays clean
    secret = "aws_secret_access_key = " + "a1B2" * 10
    assert findings(f"id: {key_id}") == [key_id]
    assert findings("ASIA" + "7" * 16)
    assert findings(secret)
    assert findings('"SecretAccessKey": "' + "x/Y+" * 10 + '"')
    assert not findings("AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing")


def test_no_credentials_in_repository_files():
    files = repository_files()
    assert any(path.name == "pyproject.toml" for path in files)
    leaks = {}
    for path in files:
        text = text_of(path)
        if text is not None and (found := findings(text)):
            leaks[str(path.relative_to(ROOT))] = [f[:8] + "..." for f in found]
    assert not leaks, f"possible AWS credentials (remove them, then rotate the keys): {leaks}"
