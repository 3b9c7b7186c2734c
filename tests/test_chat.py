"""Chat SFT (train/data/chat.py, task sft): the label rule against an oracle and against
transformers' own assistant mask, on the template families users bring (verbatim templates in
tests/fixtures/chat_templates, each with a tiny BPE trained here with its special tokens); the
known traps; bad input; packing isolation; and a 2-rank run with exact resume."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import free_port, run_cli, write_jsonl

from train.data import chat
from train.data.loader import IGNORE_INDEX, PackedLoader
from train.errors import UsageError

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
REPO = Path(__file__).resolve().parents[1]

# Each family: its template, special tokens, which special is BOS/EOS/pad, its end-of-turn, and
# whether it accepts a system prompt. The traps live here: Qwen's end-of-turn is its EOS and its
# pad (pad == EOS); Mistral's EOS ends every assistant turn and is its pad; Llama 3 and Qwen take
# a system prompt.
FAMILIES = {
    "llama3": dict(template="llama3.jinja", eot="<|eot_id|>", system=True,
                   specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                             "<|end_header_id|>", "<|eot_id|>"],
                   bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|end_of_text|>"),
    "qwen": dict(template="qwen.jinja", eot="<|im_end|>", system=True,
                 specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                 bos=None, eos="<|im_end|>", pad="<|im_end|>"),
    "gemma": dict(template="gemma.jinja", eot="<end_of_turn>", system=False,
                  specials=["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
                  bos="<bos>", eos="<eos>", pad="<pad>"),
    "mistral": dict(template="mistral.jinja", eot="</s>", system=False,
                    specials=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
                    bos="<s>", eos="</s>", pad="</s>"),
}
WORDS = ("the rank shard token def return café naïve 数据 模型 😀 x=1 (a, b) {k: v} 'quoted' "
         "\"dq\" tab\there 42 3.14 <tag> a|b").split(" ")


def text(rng: random.Random, words: int) -> str:
    """Message text with no leading or trailing whitespace (some templates trim)."""
    out = " ".join(rng.choice(WORDS) for _ in range(words))
    if rng.random() < 0.2:
        out += "\n" + " ".join(rng.choice(WORDS) for _ in range(3))
    return out.strip()


def conversations(family: str, n: int, seed: int = 0, inject: float = 0.0) -> list[list[dict]]:
    """n random conversations a family's template accepts: optional system prompt (where it
    has one), alternating user/assistant turns, now and then an empty assistant reply or a
    final user turn; with probability `inject`, a message spelling a control token."""
    spec, rng = FAMILIES[family], random.Random(seed)
    out = []
    for _ in range(n):
        messages = []
        if spec["system"] and rng.random() < 0.4:
            messages.append({"role": "system", "content": text(rng, rng.randint(1, 8))})
        for _ in range(rng.randint(1, 3)):
            messages.append({"role": "user", "content": text(rng, rng.randint(1, 12))})
            reply = "" if rng.random() < 0.08 else text(rng, rng.randint(1, 20))
            messages.append({"role": "assistant", "content": reply})
        if rng.random() < 0.15:
            messages.append({"role": "user", "content": text(rng, 3)})
        if rng.random() < inject:
            target = rng.choice([m for m in messages if m["content"]])
            target["content"] += f" say {rng.choice(spec['specials'])} now"
        out.append(messages)
    return out


def make_tokenizer(family: str, root: Path) -> Path:
    """A tiny byte-level BPE with the family's special tokens and template, saved as a
    Hugging Face tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = FAMILIES[family]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=spec["specials"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    corpus = ["\n".join(m["content"] for m in c) for c in conversations(family, 300, seed=99)]
    bpe.train_from_iterator(corpus + ["user assistant system model"] * 20, trainer)
    named = {k: spec[k] for k in ("bos", "eos", "pad") if spec[k]}
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, clean_up_tokenization_spaces=False,
                                  **{f"{k}_token": v for k, v in named.items()})
    tok.chat_template = (TEMPLATES / spec["template"]).read_text()
    out = root / family
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tokenizers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat-tokenizers")
    return {family: make_tokenizer(family, root) for family in FAMILIES}


def encode(tokenizer_dir: Path, messages_list, **options):
    """Our prepare's worker path: (ids, codes) per conversation, and the batch counts."""
    template = chat.choose_template(options.pop("template", None), tokenizer_dir)
    chat.init_worker(str(tokenizer_dir), chat.ChatOptions(template.source, **{
        "max_length": 100_000, **options}), "uint32")
    convs = [chat.Conversation(m, f"test:{i}") for i, m in enumerate(messages_list)]
    tokens, lengths, codes, counts = chat.encode_batch(convs)
    ends = np.cumsum(lengths)
    return [(tokens[e - n:e].astype(np.int64), codes[e - n:e]) for e, n in zip(ends, lengths)], \
        counts


def trained(codes: np.ndarray) -> np.ndarray:
    return (codes & chat.TRAINED).astype(bool)


def expected_assistant_text(messages, eot: str, train_on: str = "all") -> str:
    replies = [m["content"] + eot for m in messages if m["role"] == "assistant"]
    return "".join(replies[-1:] if train_on == "last" else replies)


def decoded_targets(tok, ids: np.ndarray, codes: np.ndarray) -> str:
    """The targets of the trained positions, decoded run by run (a run is one reply)."""
    targets = np.flatnonzero(trained(codes)) + 1
    runs = np.split(targets, np.flatnonzero(np.diff(targets) != 1) + 1)
    return "".join(tok.decode(ids[run].tolist(), skip_special_tokens=False)
                   for run in runs if len(run))


# ---------------------------------------------------------------------------------------------
# The label rule
# ---------------------------------------------------------------------------------------------

ENGINES = ["hf", "tiktoken"]  # prepare's two tokenizers: each must give the same ids and masks


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("family", FAMILIES)
def test_labels_agree_with_transformers_assistant_mask_token_for_token(tokenizers, family,
                                                                       engine):
    """The peer check: on 200 conversations, our ids equal apply_chat_template's, and token t
    is trained exactly when apply_chat_template's assistant mask marks t+1."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizers[family])
    convs = conversations(family, 200, seed=1)
    encoded, counts = encode(tokenizers[family], convs, engine=engine)
    assert counts["conversations"] == 200 and counts["escaped_special_strings"] == 0
    for messages, (ids, codes) in zip(convs, encoded):
        theirs = tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True)
        assert ids.tolist() == theirs["input_ids"]
        mask = np.asarray(theirs["assistant_masks"], dtype=bool)
        assert trained(codes)[:-1].tolist() == mask[1:].tolist()
        assert not trained(codes)[-1] and mask.any()
        assert (codes & chat.CONVERSATION_START).tolist() == [2] + [0] * (len(ids) - 1)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("train_on", ["all", "last"])
@pytest.mark.parametrize("family", FAMILIES)
def test_trained_targets_decode_to_exactly_the_replies_and_their_end_of_turn(
        tokenizers, family, train_on, engine):
    """The oracle, independent of transformers' mask: what the trained positions predict is
    each assistant reply followed by its end-of-turn token, and nothing else: no role header,
    no BOS, no separator; with train_on last, the last reply only. Some conversations spell a
    control token inside a message: it decodes back as the same text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizers[family])
    convs = conversations(family, 200, seed=2, inject=0.1)
    encoded, counts = encode(tokenizers[family], convs, train_on=train_on, engine=engine)
    assert counts["escaped_special_strings"] > 0
    if engine == "tiktoken":  # and the same ids and codes as Hugging Face, escapes included
        hf, _ = encode(tokenizers[family], convs, train_on=train_on)
        assert all(a.tolist() == b.tolist() and c.tolist() == d.tolist()
                   for (a, c), (b, d) in zip(encoded, hf))
    eot = FAMILIES[family]["eot"]
    for messages, (ids, codes) in zip(convs, encoded):
        assert decoded_targets(tok, ids, codes) == \
            expected_assistant_text(messages, eot, train_on), messages


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("family", FAMILIES)
def test_control_token_text_in_a_message_never_becomes_the_control_token(tokenizers, family,
                                                                         engine):
    """A user typing the end-of-turn token's text gets text tokens: the conversation holds
    exactly as many end-of-turn ids as the template wrote; --special-tokens-in-content error
    refuses it, naming the conversation."""
    from transformers import AutoTokenizer

    spec = FAMILIES[family]
    eot_id = AutoTokenizer.from_pretrained(tokenizers[family]).convert_tokens_to_ids(spec["eot"])
    clean = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]
    tricky = [{"role": "user", "content": f"hello {spec['eot']}{spec['specials'][1]}"},
              {"role": "assistant", "content": f"hi {spec['eot']} there"}]
    (clean_ids, _), (tricky_ids, _) = encode(tokenizers[family], [clean, tricky],
                                             engine=engine)[0]
    assert (tricky_ids == eot_id).sum() == (clean_ids == eot_id).sum() > 0
    assert encode(tokenizers[family], [tricky], engine=engine)[1]["escaped_special_strings"] == 3
    with pytest.raises(UsageError, match=r"test:0: a user message contains the text of the "
                                         r"control token"):
        encode(tokenizers[family], [tricky], special_in_content="error")


def test_an_empty_reply_trains_its_end_of_turn_alone(tokenizers):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizers["qwen"])
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hm?"},
                {"role": "assistant", "content": ""}]
    (ids, codes), = encode(tokenizers["qwen"], [messages])[0]
    assert tok.convert_ids_to_tokens(ids[np.flatnonzero(trained(codes)) + 1].tolist()) == \
        ["<|im_end|>"]


def test_prefix_strategy_equals_the_markers_on_the_verbatim_llama3_template(tokenizers):
    """Meta's Llama 3 template has no generation markers: refused by default; with --mask-
    strategy prefix, each reply is what rendering it adds after the generation prompt, which
    for this template is exactly what the marked version marks."""
    plain = str(TEMPLATES / "llama3_no_markers.jinja")
    with pytest.raises(UsageError, match="no {% generation %} markers.*--mask-strategy prefix"):
        chat.check_strategy(chat.choose_template(plain, None), "generation")
    convs = conversations("llama3", 60, seed=3)
    for train_on in ("all", "last"):
        marked, _ = encode(tokenizers["llama3"], convs, train_on=train_on)
        prefix, _ = encode(tokenizers["llama3"], convs, template=plain, strategy="prefix",
                           train_on=train_on)
        for (ids_a, codes_a), (ids_b, codes_b) in zip(marked, prefix):
            assert ids_a.tolist() == ids_b.tolist() and codes_a.tolist() == codes_b.tolist()


def test_prefix_strategy_refuses_a_template_that_rewrites_history(tokenizers, tmp_path):
    rewriting = tmp_path / "rewrites.jinja"  # marks the last message: earlier renders differ
    rewriting.write_text("{% for m in messages %}{% if loop.last %}LAST {% endif %}"
                         "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(UsageError, match="test:0: --mask-strategy prefix: .* not render turn 1 "
                                         "as an exact token prefix"):
        encode(tokenizers["qwen"], [[{"role": "user", "content": "q"},
                                     {"role": "assistant", "content": "a"}]],
               template=str(rewriting), strategy="prefix")


def test_too_long_conversations_are_dropped_or_truncated_and_counted(tokenizers):
    convs = conversations("qwen", 50, seed=5)
    full, _ = encode(tokenizers["qwen"], convs)
    lengths = np.array([len(ids) for ids, _ in full])
    limit = int(np.median(lengths))
    dropped, counts = encode(tokenizers["qwen"], convs, max_length=limit)
    assert counts["dropped_too_long"] == (lengths > limit).sum() > 0
    # a dropped conversation keeps its place with no tokens (resume counts input conversations)
    assert [len(ids) for ids, _ in dropped] == [n if n <= limit else 0 for n in lengths]
    _, counts = encode(tokenizers["qwen"], convs, max_length=limit, too_long="truncate")
    kept = counts["conversations"] + counts["dropped_no_trained_token"]
    assert counts["truncated"] == (lengths > limit).sum() and kept == 50
    long_one = int(np.argmax(lengths))
    (ids, codes), = encode(tokenizers["qwen"], [convs[long_one]], max_length=limit,
                           too_long="truncate")[0]
    whole, whole_codes = full[long_one]
    assert ids.tolist() == whole[:limit].tolist()
    # the cut end's last token predicts nothing: its target was cut off
    assert trained(codes)[:-1].tolist() == trained(whole_codes)[:limit - 1].tolist()
    assert not trained(codes)[-1]


@pytest.mark.parametrize("engine", ["hf", "tiktoken"])
@pytest.mark.parametrize("too_long", ["drop", "truncate"])
def test_a_batch_encodes_each_conversation_as_it_encodes_alone(tokenizers, engine, too_long):
    """The worker encodes a whole batch at once (one mask, one set of codes): each
    conversation's ids, codes and counts are those it gets alone, whatever its neighbours;
    among them too long ones, ones a cut leaves nothing to train (dropped in place), control
    token text (escaped) and non-ASCII text."""
    convs = conversations("qwen", 40, seed=9, inject=0.2)
    convs[3][-1]["content"] += " Zürich → 東京"
    lengths = np.array([len(ids) for ids, _ in encode(tokenizers["qwen"], convs)[0]])
    options = dict(max_length=int(np.percentile(lengths, 70)), too_long=too_long,
                   engine=engine)
    batch, counts = encode(tokenizers["qwen"], convs, **options)
    alone = [encode(tokenizers["qwen"], [c], **options) for c in convs]
    assert [ids.tolist() for ids, _ in batch] == [a[0][0][0].tolist() for a in alone]
    assert [codes.tolist() for _, codes in batch] == [a[0][0][1].tolist() for a in alone]
    total = {k: sum(a[1][k] for a in alone) for k in counts if not k.startswith("max_")}
    assert {k: v for k, v in counts.items() if not k.startswith("max_")} == total
    assert counts["max_conversation_tokens"] == max(a[1]["max_conversation_tokens"]
                                                    for a in alone)
    assert counts["escaped_special_strings"] > 0 and counts["conversations"] > 0
    assert counts["dropped_too_long" if too_long == "drop" else "truncated"] > 0


# ---------------------------------------------------------------------------------------------
# Formats and bad input through the command line
# ---------------------------------------------------------------------------------------------

def prepare(tmp_path, records, tokenizer, *extra, name="chats.jsonl"):
    from train.prepare import main

    source = write_jsonl(tmp_path / name, records)
    out = tmp_path / "out"
    code = main(["--task", "sft", "--input", str(source), "--output", str(out), "--tokenizer",
                 str(tokenizer), "--workers", "1", "--no-progress", "--val-fraction", "0",
                 "--overwrite", *extra])
    return code, out


@pytest.mark.parametrize("records, fmt", [
    ([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}],
     "messages"),
    ([{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}],
     "sharegpt"),
    ([{"instruction": "q", "input": "", "output": "a"}], "alpaca"),
    ([{"prompt": "q", "completion": "a"}], "prompt-completion"),
])
def test_each_format_is_detected_named_and_renders_the_same_chat(tokenizers, tmp_path, records,
                                                                 fmt, capsys):
    code, out = prepare(tmp_path, records * 3, tokenizers["qwen"])
    assert code == 0
    index = json.loads((out / "index.json").read_text())
    assert index["task"] == "sft" and index["chat"]["formats"] == [fmt]
    assert f"formats {fmt}" in capsys.readouterr().err
    expected, _ = encode(tokenizers["qwen"], [[{"role": "user", "content": "q"},
                                               {"role": "assistant", "content": "a"}]])
    tokens = np.fromfile(out / "train-00000.bin", dtype=index["dtype"])
    assert tokens.tolist() == expected[0][0].tolist() * 3
    chat_index = index["chat"]
    assert chat_index["counts"]["conversations"] == 3 and chat_index["train_on"] == "all"
    assert chat_index["mask_strategy"] == "generation"
    assert chat_index["template_sha256"] == chat.ChatTemplate(
        (TEMPLATES / "qwen.jinja").read_text(), "").sha256


def test_messages_field_names_a_nested_list_and_ambiguity_asks_for_it(tokenizers, tmp_path,
                                                                       capsys):
    both = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "prompt": "p", "completion": "c"}
    with pytest.raises(SystemExit) as exit_info:
        prepare(tmp_path, [both], tokenizers["qwen"])
    assert exit_info.value.code == 2
    assert "fits several formats (messages, prompt-completion): name the field of messages " \
           "with --messages-field" in capsys.readouterr().err
    code, out = prepare(tmp_path, [both], tokenizers["qwen"], "--messages-field", "messages")
    assert code == 0


BAD = {
    "unknown role": ([{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}],
                     "message 1 has the unknown role 'robot'"),
    "missing content": ([{"role": "user"}, {"role": "assistant", "content": "a"}],
                        "message 0 (user) is missing its content"),
    "no assistant": ([{"role": "user", "content": "q"}], "the conversation has no assistant turn"),
    "non-string content": ([{"role": "user", "content": [{"type": "text", "text": "q"}]},
                            {"role": "assistant", "content": "a"}],
                           "message 0 (user) has content of type list, not a string"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_conversations_exit_2_naming_file_line_and_problem(tokenizers, tmp_path, case,
                                                               capsys):
    good = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    messages, problem = BAD[case]
    with pytest.raises(SystemExit) as exit_info:
        prepare(tmp_path, [{"messages": good}, {"messages": messages}], tokenizers["qwen"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert f"chats.jsonl:2: {problem}" in err
    assert not (tmp_path / "out" / "index.json").exists()


def test_templates_refused_exit_2_through_the_real_command(tokenizers, tmp_path):
    """A template without markers (and no prefix strategy), and a tokenizer with no template
    and no --chat-template: one line each, exit 2, no traceback."""
    source = write_jsonl(tmp_path / "c.jsonl", [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("tokenizer.json", "special_tokens_map.json"):
        if (tokenizers["qwen"] / name).exists():
            (bare / name).write_bytes((tokenizers["qwen"] / name).read_bytes())
    config = json.loads((tokenizers["qwen"] / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    cases = [(["--tokenizer", str(tokenizers["llama3"]), "--chat-template",
               str(TEMPLATES / "llama3_no_markers.jinja")],
              "has no {% generation %} markers"),
             (["--tokenizer", str(bare)], "has no chat template: pass --chat-template FILE")]
    for extra, message in cases:
        res = run_cli("-m", "train.prepare", "--task", "sft", "--input", str(source),
                      "--output", str(tmp_path / "out"), "--no-progress", *extra)
        assert res.returncode == 2, res.stderr
        assert message in res.stderr and "Traceback" not in res.stderr


# ---------------------------------------------------------------------------------------------
# Batches: whole conversations, boundaries from the offsets, labels from the mask
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def qwen_shards(tmp_path_factory, tokenizers) -> tuple[Path, list[list[dict]]]:
    """Qwen-style shards: the end-of-turn <|im_end|> is the EOS, inside every conversation."""
    from train.prepare import main

    root = tmp_path_factory.mktemp("qwen-shards")
    convs = conversations("qwen", 120, seed=6)
    source = write_jsonl(root / "chats.jsonl", [{"messages": m} for m in convs])
    assert main(["--task", "sft", "--input", str(source), "--output", str(root / "out"),
                 "--tokenizer", str(tokenizers["qwen"]), "--workers", "2", "--no-progress",
                 "--val-fraction", "0.1", "--shard-tokens", "2000", "--max-length", "128"]) == 0
    return root / "out", convs


def test_windows_hold_whole_conversations_split_at_the_offsets_not_at_eos(qwen_shards):
    from types import SimpleNamespace

    from train.tasks import ChatSFT

    out, _ = qwen_shards
    index = json.loads((out / "index.json").read_text())
    assert index["eos_id"] == index["special_ids"]["eos_token"]
    assert index["special_ids"]["pad_token"] == index["eos_id"]  # the pad == EOS trap
    cfg = SimpleNamespace(data=SimpleNamespace(seq_len=128))
    from train.data.shards import ShardIndex
    task = ChatSFT(cfg, ShardIndex.load(out))
    loader = PackedLoader(out, seq_len=128, micro_batch_size=4, shuffle=False,
                          **task.loader_options())
    stream_codes = loader.stream.conversation_codes.read(0, loader.stream.num_tokens)
    stream_tokens = loader.stream.read(0, loader.stream.num_tokens)
    starts = np.flatnonzero(stream_codes & chat.CONVERSATION_START)
    assert (stream_tokens == index["eos_id"]).sum() > 2 * len(starts)  # EOS ends every turn
    for batch in loader.one_pass():
        batch = task.train_batch(batch)
        for row, sample in enumerate(batch["sample_ids"]):
            start, stop = loader.window_starts[sample], loader.window_starts[sample + 1]
            assert start in starts and (stop in starts or stop == len(stream_tokens))
            n = stop - start
            positions = batch["position_ids"][row, :n]
            firsts = starts[(starts >= start) & (starts < stop)] - start
            assert np.flatnonzero(positions == 0).tolist() == firsts.tolist()
            codes = stream_codes[start:stop]
            want = np.where(codes & chat.TRAINED, np.append(stream_tokens[start + 1:stop], -1),
                            IGNORE_INDEX)
            assert batch["labels"][row, :n].tolist() == want.tolist()
            assert (batch["labels"][row, n:] == IGNORE_INDEX).all()


def test_a_conversation_longer_than_seq_len_is_refused_before_training(qwen_shards):
    from types import SimpleNamespace

    from train.data.shards import ShardIndex
    from train.errors import DataError
    from train.tasks import ChatSFT

    out, _ = qwen_shards
    with pytest.raises(DataError, match="raise data.seq_len, or prepare again with "
                                        "--max-length 32"):
        ChatSFT(SimpleNamespace(data=SimpleNamespace(seq_len=32)), ShardIndex.load(out))


def test_a_changed_template_or_mask_is_config_drift(qwen_shards):
    from train.data.shards import ShardIndex
    from train.run import config_drift

    out, _ = qwen_shards
    index = ShardIndex.load(out)
    before = config_drift.data_identity(index)
    index.chat = {**index.chat, "train_on": "last"}
    after = config_drift.data_identity(index)
    found = config_drift.changes({}, {}, 1, 1, before, after)
    assert ("data.chat_train_on", "all", "last") in found


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_each_conversation_loss_in_a_packed_batch_equals_its_loss_alone(qwen_shards, backend):
    """Isolation: a conversation's summed loss inside a packed batch equals the same
    conversation run alone, fp32 on CPU, within 1e-6 relative: attention never crosses the
    offsets and positions restart at each conversation."""
    import copy

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from train.data.loader import as_torch
    from train.data.shards import ShardIndex
    from train.model import PackedModel
    from types import SimpleNamespace
    from train.tasks import ChatSFT

    out, _ = qwen_shards
    task = ChatSFT(SimpleNamespace(data=SimpleNamespace(seq_len=128)), ShardIndex.load(out))
    loader = PackedLoader(out, seq_len=128, micro_batch_size=3, shuffle=False,
                          **task.loader_options())
    batch = task.train_batch(next(loader.one_pass()))
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=600,
                                    n_positions=128, attn_pdrop=0.0, resid_pdrop=0.0,
                                    embd_pdrop=0.0))
    model = PackedModel(copy.deepcopy(hf), attention=backend, cross_entropy=backend).eval()
    t = as_torch(batch)
    cu = batch["cu_seqlens"]
    flat_labels = batch["labels"].reshape(-1)
    checked = 0
    for a, b in zip(cu[:-1], cu[1:]):
        if (flat_labels[a:b] == IGNORE_INDEX).all():
            continue  # padding
        only = np.full_like(flat_labels, IGNORE_INDEX)
        only[a:b] = flat_labels[a:b]
        with torch.no_grad():
            packed, n = model(t["input_ids"], torch.from_numpy(only.reshape(batch["labels"].shape)),
                              t["position_ids"], t["cu_seqlens"], t["max_seqlen"])
            ids = torch.from_numpy(batch["input_ids"].reshape(-1)[a:b])[None]
            alone = hf(input_ids=ids).logits[0].double()  # the plain model, one conversation
        targets = torch.from_numpy(flat_labels[a:b])
        keep = targets != IGNORE_INDEX
        reference = torch.nn.functional.cross_entropy(alone[keep], targets[keep],
                                                      reduction="sum")
        assert int(n) == int(keep.sum())
        assert abs(float(packed) - float(reference)) <= 1e-6 * abs(float(reference)), \
            (float(packed), float(reference))
        checked += 1
    assert checked >= 3


# ---------------------------------------------------------------------------------------------
# A real run: 2 ranks, exact resume, export parity, generate --chat
# ---------------------------------------------------------------------------------------------

def train(data: Path, out: Path, *overrides: str, nproc: int = 2, env: dict | None = None):
    args = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", "-m", "train"] if nproc > 1 else ["-m", "train"]
    return run_cli(*args, str(REPO / "configs" / "tiny-sft.yaml"), f"data.path={data}",
                   f"output_dir={out}", "data.seq_len=128", "model.config.n_positions=128",
                   "model.config.n_embd=64", "per_device_train_batch_size=2", "max_steps=8",
                   "logging_steps=2", "eval_steps=4", "eval_max_batches=2", *overrides,
                   env={"DS_ACCELERATOR": "cpu", **(env or {})}, timeout=300)


def steps_by_number(out: Path) -> dict[int, dict]:
    """metrics.jsonl's training-step records by step (a resumed run's last record wins)."""
    return {r["step"]: r for line in (out / "metrics.jsonl").read_text().splitlines()
            if "loss" in (r := json.loads(line))}


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "loss" in (r := json.loads(line))}


@pytest.mark.slow
def test_two_rank_sft_resumes_exactly_also_on_one_rank_exports_the_template_and_chats(
        qwen_shards, tmp_path):
    out, convs = qwen_shards
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    res = train(out, straight, "save_steps=100")
    assert res.returncode == 0, res.stderr[-3000:]
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert all(0 < r["trained_tokens_seen"] < r["real_tokens_seen"] for r in steps)
    assert steps[-1]["trained_tokens_seen"] > steps[0]["trained_tokens_seen"]
    assert all("perplexity" in r for r in records if "eval_loss" in r)

    res = train(out, killed, "save_steps=4", env={"TRAIN_FAULT_CRASH_IN_SAVE_AT_STEP": "8"})
    assert res.returncode != 0
    moved = tmp_path / "moved"  # the same stopped state, resumed below under 1 rank
    shutil.copytree(killed, moved)
    res = train(out, killed, "save_steps=4")
    assert res.returncode == 0 and "resumed from" in res.stderr, res.stderr[-3000:]
    assert losses(killed) == losses(straight)  # bit for bit

    # Under 1 rank with the same global batch (2 x 2 -> 4 x 1), as tests/test_train.py resumes
    # CLM: the same conversations in each step (trained_tokens_seen exactly), the losses equal
    # to float rounding (another rank count sums gradients in another order), not bits.
    res = train(out, moved, "save_steps=4", "per_device_train_batch_size=4", nproc=1)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "step-00000004" in res.stderr and "saved by 2 ranks, now 1" in res.stderr
    want, got = steps_by_number(straight), steps_by_number(moved)
    for step in (6, 8):
        assert got[step]["trained_tokens_seen"] == want[step]["trained_tokens_seen"]
        assert got[step]["real_tokens_seen"] == want[step]["real_tokens_seen"]
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], abs=1e-3)

    final = straight / "final"
    assert (final / chat.TEMPLATE_FILE).read_text() == (TEMPLATES / "qwen.jinja").read_text()
    parity = json.loads((final / "chat_parity.json").read_text())
    assert parity["checked"] > 0 and parity["mismatched"] == 0
    messages = tmp_path / "messages.json"
    messages.write_text(json.dumps([{"role": "user", "content": "the rank"}]))
    res = run_cli("-m", "train.generate", "--model", str(final), "--chat", "--messages",
                  str(messages), "--max-new-tokens", "8")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "<|im_start|>" not in res.stdout
