"""The README's workflow runs top to bottom as written: its command blocks, in order, in one shell.

Only what the README leaves for the user to supply is substituted: their model directories and data files
(tiny toy ones here), the port, and sizes a 2-layer toy model cannot take (top:4 of 2 blocks, 256 tokens).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import toy

pytestmark = pytest.mark.slow  # exports and trains tiny models through the CLI

README = Path(__file__).resolve().parents[1] / "README.md"
CHATML = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
          "{% if add_generation_prompt %}assistant:{% endif %}")
SECTIONS = ["Fine-tune a classifier", "Fine-tune a causal LM", "The adapter store"]


def readme_block(section: str) -> list[str]:
    """The command lines of the first ```bash block under the README heading ``section``."""
    text = README.read_text()
    body = text.split(f"## {section}\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", body, re.S)
    assert block, f"README section {section!r} has no bash block"
    return [line.split("   #")[0].split("  # ")[0].rstrip() for line in block.group(1).splitlines() if line.strip()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_readme_workflow_runs_top_to_bottom(tmp_path):
    bert, llama = toy.make_model("bert", tmp_path / "my-bert"), toy.make_model("llama", tmp_path / "my-llama")
    config = json.loads((llama / "tokenizer_config.json").read_text())  # `chat` needs the model's chat template
    (llama / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
    rows = [{"text": r["text"], "label": {"negative": "bug", "positive": "praise"}[r["label"]]}
            for r in toy.classification_rows(48, seed=1)]
    toy.write_jsonl(tmp_path / "tickets.jsonl", rows)
    toy.write_jsonl(tmp_path / "held-out.jsonl", rows[:16])
    toy.write_jsonl(tmp_path / "notes.jsonl", toy.lm_rows(32))
    (tmp_path / "held-out.txt").write_text("\n\n".join(r["text"] for r in toy.lm_rows(6)))
    port = _free_port()
    steps = {"--steps 200": "--steps 4"}  # a workflow check, not a training run
    classifier = [_sub(line, {"./my-bert": str(bert), **steps}) for line in readme_block(SECTIONS[0])]
    causal = [_sub(line, {"./my-llama": str(llama), "top:4": "top:1", "--max-seq-len 256": "--max-seq-len 32",
                          "./server-adapter": "./my-adapter", **steps}) for line in readme_block(SECTIONS[1])]
    store = []
    for line in readme_block(SECTIONS[2]):
        line = _sub(line, {"8080": str(port), "<fingerprint>": "$FP"})
        if " serve " in f" {line}":
            store += [f"{line} > serve.log 2>&1 &", "SERVER=$!", "trap 'kill $SERVER' EXIT",
                      f"for i in $(seq 100); do (echo > /dev/tcp/127.0.0.1/{port}) 2>/dev/null && break; sleep 0.2; done"]
        else:
            store.append(line)
    fingerprint = "FP=$(python -c \"import json; print(json.load(open('artifact/manifest.json'))['adapter']['base_fingerprint'])\")"
    script = "\n".join(["set -euo pipefail", "cd cls", *classifier, "cd ../lm", *causal, fingerprint, *store])
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "TOKENIZERS_PARALLELISM": "false"}
    for name in ("tickets.jsonl", "held-out.jsonl", "notes.jsonl", "held-out.txt"):
        for sub in ("cls", "lm"):
            (tmp_path / sub).mkdir(exist_ok=True)
            (tmp_path / sub / name).write_bytes((tmp_path / name).read_bytes())
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"

    pulled = tmp_path / "lm" / "adapter"
    config = json.loads((pulled / "adapter_config.json").read_text())
    assert (pulled / "adapter_model.safetensors").is_file() and config["peft_type"] == "LORA"
    assert "billing" in json.loads((tmp_path / "cls" / "artifact" / "manifest.json").read_text())["labels"]


def _sub(line: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        line = line.replace(old, new)
    return line
