"""README's usage snippet runs as written against the built-in model."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def usage_snippet() -> str:
    text = README.read_text()
    usage = text[text.index("## Usage") :]
    return re.search(r"```python\n(.*?)```", usage, re.S).group(1)


def test_readme_usage_runs_with_the_built_in_model(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path))  # builds the current built-in model
    code = usage_snippet()
    assert "LLM()" in code and "random" in code
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    outs, chat, stopped = scope["outs"], scope["chat"], scope["stopped"]
    assert len(outs) == 2 and all(o["finish_reason"] in ("stop", "length") for o in outs)
    assert len(chat) == 1 and isinstance(chat[0]["text"], str)
    assert len(stopped[0]["logprobs"]) == len(stopped[0]["token_ids"])
    assert (tmp_path / "nanovllm").exists()
    llm = scope["llm"]
    assert llm.get_tokenizer().chat_template  # the built-in model ships one
    assert all(0 <= t < llm.runtime.hf_config.vocab_size for t in scope["ids"])
    llm.exit()
