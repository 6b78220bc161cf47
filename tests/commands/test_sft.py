"""SFT (`moejax train --sft`): chat records formatted with the model's own template (token for token as
`tokenizer.apply_chat_template`), whole conversations packed with segment ids, the loss on assistant tokens only and
equal to transformers' loss with labels -100 on the prompt and template tokens; and expert-selective training
through the command line.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")  # the test extra

import torch
import transformers

import moejax
from moejax.cli import main
from moejax.data.mixture import IGNORE_INDEX, Source
from moejax.data.sft import ConversationRows, format_chat, load_conversations, read_records
from moejax.data.tokenize import HFTokenizer
from moejax.errors import DataError
from moejax.parity.fixtures import make_checkpoint, save_byte_tokenizer
from moejax.training.config import TrainConfig
from moejax.training.step import init_state, make_train_step

pytestmark = [pytest.mark.torch, pytest.mark.slow]  # the quick loop covers their parts (steering, packing)
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
RECORDS = {
    "he": [{"messages": [{"role": "system", "content": "ענה בקצרה."}, {"role": "user", "content": "מה בירת צרפת?"},
                         {"role": "assistant", "content": "פריז."}]},
           {"prompt": "כמה זה שתיים ועוד שתיים?", "response": "ארבע."},
           {"messages": [{"role": "user", "content": "היי"}, {"role": "assistant", "content": "שלום לך"},
                         {"role": "user", "content": "מה שלומך?"}, {"role": "assistant", "content": "טוב, תודה."}]}],
    "en": [{"prompt": "Name a colour.", "response": "Blue."},
           {"messages": [{"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello! How can I help?"}]}],
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    reference, path = make_checkpoint("qwen3_moe", root / "model", seed=9, vocab_size=259)
    save_byte_tokenizer(path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(path)
    for lang, records in RECORDS.items():
        (root / f"{lang}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                                            encoding="utf-8")
    return root, reference, path


def test_template_tokens_and_assistant_mask(setup):
    root, _, path = setup
    tok = transformers.AutoTokenizer.from_pretrained(path)
    for messages in read_records(root / "he.jsonl") + read_records(root / "en.jsonl"):
        ids, trained = format_chat(tok, messages)
        assert ids.tolist() == tok.apply_chat_template(messages, tokenize=True, return_dict=False)
        text = tok.decode(ids[trained].tolist())
        for m in messages:
            assert (m["content"] in text) == (m["role"] == "assistant"), (m, text)
        assert text.count("</s>") == sum(m["role"] == "assistant" for m in messages)  # end of each answer


def test_packed_sft_loss_equals_transformers_with_masked_labels(setup):
    """A batch of whole conversations packed into rows: moejax's loss (assistant tokens only) equals the loss of
    transformers run on each conversation alone with labels -100 everywhere but the assistant tokens, pooled over
    the same tokens."""
    root, reference, path = setup
    tokenizer = HFTokenizer(path)
    sources = [Source("he", root / "he.jsonl", 0.5), Source("en", root / "en.jsonl", 0.5)]
    conversations = {s.lang: load_conversations(s, tokenizer, 259) for s in sources}
    rows = ConversationRows(sources, conversations, seq_len=192, batch_size=3, seed=0)
    batch = rows.next_batch()
    assert (batch.segment_ids.max(axis=1) >= 2).any(), "no row packs two conversations: the test proves less"
    model = moejax.from_pretrained(path)
    cfg = TrainConfig(lb_coef=0.0, learning_rate=1e-9)
    graphdef, state, tx = init_state(model, cfg)
    _, metrics = make_train_step(graphdef, tx, cfg, model.config)(state, {
        "input_ids": batch.input_ids, "segment_ids": batch.segment_ids, "position_ids": batch.position_ids,
        "labels": batch.labels})
    total, count = 0.0, 0
    for r in range(batch.input_ids.shape[0]):
        for segment in range(1, batch.segment_ids[r].max() + 1):
            at = batch.segment_ids[r] == segment
            ids, labels = batch.input_ids[r, at], batch.labels[r, at]
            with torch.no_grad():
                out = reference(input_ids=torch.from_numpy(ids[None].astype(np.int64)),
                                labels=torch.from_numpy(labels[None].astype(np.int64)))
            n = int((labels[1:] != IGNORE_INDEX).sum())
            total += out.loss.item() * n
            count += n
    assert int(metrics["tokens"]) == count > 0
    assert abs(float(metrics["loss"]) - total / count) <= 1e-5


def test_sft_command_runs_and_records_it(setup, tmp_path, capsys):
    root, _, path = setup
    out = tmp_path / "run"
    data = f"he={root / 'he.jsonl'}:0.5,en={root / 'en.jsonl'}:0.5"
    assert main(["train", "--model", str(path), "--sft", "--data", data,
                 "--eval-data", f"en={root / 'en.jsonl'}", "--eval-every", "2", "--steps", "2", "--seq-len", "128",
                 "--batch-size", "2", "--out", str(out), "--quiet"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["sft"] is True and run["budget"]["share"] == 1.0
    assert len((out / "eval.csv").read_text().splitlines()) == 3


def test_expert_selective_command_records_its_budget(setup, tmp_path, capsys):
    root, _, path = setup
    selection = tmp_path / "selected_experts.json"
    selection.write_text(json.dumps({"he": {"seft": {"3": [1]}, "ssft_k5": {"3": [1, 2]}}}))
    out = tmp_path / "run"
    assert main(["train", "--model", str(path), "--train-experts", f"{selection}:he", "--train-routers",
                 "--route-to-trained", "--steps", "2", "--seq-len", "32", "--batch-size", "2", "--out", str(out)]) == 0
    budget = json.loads((out / "run.json").read_text())["budget"]
    d, f = 48, 24
    assert budget["trainable"] == 2 * 3 * d * f + d * 8
    assert "parameters train" in capsys.readouterr().err


@pytest.mark.parametrize("record,message", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "has no assistant turn"),
    ({"question": "x"}, "an SFT record is"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages must be a list"),
])
def test_bad_records(tmp_path, record, message):
    (tmp_path / "bad.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(DataError) as caught:
        read_records(tmp_path / "bad.jsonl")
    assert message in str(caught.value) and "bad.jsonl:1" in str(caught.value)


def test_bad_command_input(setup, tmp_path, capsys):
    root, _, path = setup
    plain = tmp_path / "plain"
    make_checkpoint("qwen3_moe", plain, seed=9, vocab_size=259)
    save_byte_tokenizer(plain, chat_template=False)
    capsys.readouterr()
    (tmp_path / "sel.json").write_text(json.dumps({"he": {"seft": {"9": [1]}}}))
    cases = [
        (["--model", str(plain), "--sft", "--data", f"he={root / 'he.jsonl'}:1"], "has no chat template"),
        (["--model", str(path), "--train-experts", f"{tmp_path / 'sel.json'}:en"], "no language 'en'"),
        (["--model", str(path), "--train-experts", f"{tmp_path / 'sel.json'}:he"], "layer 9 is not an MoE layer"),
        (["--route-to-trained"], "need --train-experts"),
    ]
    for args, message in cases:
        assert main(["train", *args, "--steps", "1", "--out", str(tmp_path / "out"), "--quiet"]) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not (tmp_path / "out").exists()
