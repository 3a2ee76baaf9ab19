"""The recipe of the model that ships with dsv3 (`src/dsv3/assets/stdlib-mini`): data, tokenizer, training.

A scaled-down DeepSeek-V3 (MLA with a q LoRA, grouped sigmoid routing with the aux-loss-free bias,
a shared expert, a dense first layer, one MTP module) trained on the .py sources of the running
interpreter's standard library, plus question/answer chats built from their docstrings, with a
byte-level tokenizer. The data depend only on the Python version, the training only on them, the seed and
the torch build:

    python scripts/train_default_model.py data  --out /work/runs/stdlib-mini   # tokenizer, corpus, held-out split
    python scripts/train_default_model.py train --out /work/runs/stdlib-mini   # prints and runs `dsv3 train ...`
    python scripts/train_default_model.py ship  --out /work/runs/stdlib-mini   # FP8 checkpoint -> src/dsv3/assets
    python scripts/train_default_model.py report --out /work/runs/stdlib-mini  # held-out loss, MTP, FP8, MaxVio

`all` runs the four in order. See docs/training.md ("The shipped model").
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import inspect
import json
import os
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
ASSET = REPO / "src" / "dsv3" / "assets" / "stdlib-mini"

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"  # the V3 chat markers, ids 258 and 259 here
HELD_OUT_EVERY = 20  # a file is held out when sha256(relative path) % 20 == 0: about 5% of the files
SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
MAX_NON_ASCII = 0.02  # codec tables (encodings/cp*.py) are mostly non-ASCII: not Python worth learning
MAX_ANSWER_CHARS = 900
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '" + USER + "' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '" + ASSISTANT + "' + message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + ASSISTANT + "' }}{% endif %}"
)

# The model. Sized from measured throughput on 2 shared CPU cores (docs/training.md).
CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 320,
    "hidden_size": 128,
    "intermediate_size": 384,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 4,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 96,
    "kv_lora_rank": 64,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "n_group": 4,
    "topk_group": 2,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "seq_aux": True,
    "aux_loss_alpha": 0.001,
    "max_position_embeddings": 512,
    "rope_theta": 10000,
    "rope_scaling": None,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "num_nextn_predict_layers": 1,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "initializer_range": 0.02,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "torch_dtype": "bfloat16",
}

TRAIN_ARGS = [
    "--steps", "400",
    "--seq-len", "512",
    "--batch-size", "8",
    "--lr", "2e-3",
    "--warmup", "50",
    "--bias-update-speed", "0.01",
    "--seed", "0",
    "--log-every", "10",
    "--save-every", "50",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------- tokenizer
def _byte_chars() -> list[str]:
    """The printable character GPT-2's byte-level scheme gives each byte 0..255 (tokenizers' ByteLevel)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def write_tokenizer(out: Path) -> None:
    """tokenizer.json (byte-level, no merges: byte b -> id b + 2, BOS 0, EOS 1, chat markers 258/259) and
    tokenizer_config.json (the special tokens and the chat template)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {BOS: 0, EOS: 1} | {c: b + 2 for b, c in enumerate(_byte_chars())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(BOS, special=True, normalized=False), AddedToken(EOS, special=True, normalized=False)]
    )
    tok.add_tokens(
        [AddedToken(USER, special=False, normalized=False), AddedToken(ASSISTANT, special=False, normalized=False)]
    )
    assert tok.token_to_id(USER) == 258 and tok.token_to_id(ASSISTANT) == 259
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": CONFIG["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )


# ---------------------------------------------------------------------------------------------- data
def stdlib_files() -> list[tuple[str, Path]]:
    """(relative path, path) of the standard library's .py files used at all, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if not text.strip() or sum(ord(c) > 127 for c in text) > MAX_NON_ASCII * len(text):
                continue
            out.append((rel, path))
    return sorted(out)


def is_held_out(rel: str) -> bool:
    return int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big") % HELD_OUT_EVERY == 0


def _module_name(rel: str) -> str:
    parts = rel[: -len(".py")].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _pick(options: list[str], key: str) -> str:
    return options[int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % len(options)]


def _clip(doc: str) -> str:
    """The docstring's first paragraphs up to MAX_ANSWER_CHARS."""
    doc = inspect.cleandoc(doc)
    if len(doc) <= MAX_ANSWER_CHARS:
        return doc
    kept = ""
    for para in doc.split("\n\n"):
        if len(kept) + len(para) + 2 > MAX_ANSWER_CHARS:
            break
        kept = f"{kept}\n\n{para}" if kept else para
    return kept or doc[:MAX_ANSWER_CHARS].rsplit(" ", 1)[0]


def qa_pairs(rel: str, source: str) -> Iterator[tuple[str, str]]:
    """(question, answer) for the module and each public function, class and method with a docstring."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return
    mod = _module_name(rel)
    doc = ast.get_docstring(tree, clean=False)
    if doc and doc.strip():
        q = _pick([f"What is the {mod} module for?", f"Tell me about the {mod} module.", f"What does {mod} do?"], mod)
        yield q, f"The {mod} module. {_clip(doc)}"

    def describe(node: ast.AST, qual: str) -> Iterator[tuple[str, str]]:
        doc = ast.get_docstring(node, clean=False)
        if not doc or not doc.strip():
            return
        if isinstance(node, ast.ClassDef):
            bases = ", ".join(ast.unparse(b) for b in node.bases)
            head = f"class {qual}({bases})" if bases else f"class {qual}"
            q = _pick([f"What is {qual}?", f"What is the {qual} class?", f"Explain the class {qual}."], qual)
        else:
            head = f"{qual}({ast.unparse(node.args)})"
            q = _pick([f"What does {qual} do?", f"How do I use {qual}()?", f"Explain {qual}."], qual)
        yield q, f"`{head}`\n\n{_clip(doc)}"

    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            yield from describe(node, f"{mod}.{node.name}")
            if isinstance(node, ast.ClassDef):
                for sub in node.body:
                    if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) and not sub.name.startswith("_"):
                        yield from describe(sub, f"{mod}.{node.name}.{sub.name}")


def chats(rel: str, source: str) -> Iterator[str]:
    """Chat documents (without BOS/EOS, which the packer adds): one to three Q/A turns from one module."""
    pairs = list(qa_pairs(rel, source))
    i = 0
    while i < len(pairs):
        turns = 1 + int.from_bytes(hashlib.sha256(f"{rel}:{i}".encode()).digest()[:1], "big") % 3
        group = pairs[i : i + turns]
        i += turns
        text = ""
        for n, (q, a) in enumerate(group):
            text += f"{USER}{q}{ASSISTANT}{a}" + (EOS if n < len(group) - 1 else "")
        yield text


def build_data(out: Path) -> dict:
    """out/data/{train,heldout}.jsonl and the tokenizer in out/tokenizer; returns a summary."""
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    write_tokenizer(out / "tokenizer")
    summary = {"python": sys.version.split()[0], "train_files": 0, "heldout_files": 0, "chat_docs": 0}
    summary.update(train_bytes=0, chat_bytes=0, heldout_bytes=0)
    with (
        open(data / "train.jsonl", "w", encoding="utf-8") as train,
        open(data / "heldout.jsonl", "w", encoding="utf-8") as held,
    ):
        for rel, path in stdlib_files():
            text = path.read_text(encoding="utf-8")
            if is_held_out(rel):
                held.write(json.dumps({"text": text, "source": rel}) + "\n")
                summary["heldout_files"] += 1
                summary["heldout_bytes"] += len(text.encode())
                continue
            train.write(json.dumps({"text": text, "source": rel}) + "\n")
            summary["train_files"] += 1
            summary["train_bytes"] += len(text.encode())
            for chat in chats(rel, text):
                train.write(json.dumps({"text": chat, "source": f"chat:{rel}"}) + "\n")
                summary["chat_docs"] += 1
                summary["chat_bytes"] += len(chat.encode())
    (data / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def train_command(out: Path) -> list[str]:
    sets = [f"--set={k}={json.dumps(v)}" for k, v in CONFIG.items() if k not in ("architectures", "model_type")]
    return [
        sys.executable, "-m", "dsv3", "train", "--config", "tiny", *sets,
        "--tokenizer", str(out / "tokenizer"), "--data", str(out / "data" / "train.jsonl"),
        "--out", str(out / "run"), *TRAIN_ARGS,
    ]  # fmt: skip


def latest_checkpoint(out: Path) -> Path:
    ckpts = sorted((out / "run" / "checkpoints").glob("step-*"))
    if not ckpts:
        raise SystemExit(f"no checkpoint under {out / 'run' / 'checkpoints'}")
    return ckpts[-1]


def ship(out: Path, dest: Path = ASSET) -> Path:
    """The run's last checkpoint as the packaged model: FP8 projections, bf16 rest, tokenizer files."""
    import shutil

    import torch

    from dsv3.model.transformer import DeepSeekV3

    ckpt = latest_checkpoint(out)
    model = DeepSeekV3.from_pretrained(ckpt, dtype=torch.bfloat16)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, fp8=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(out / "tokenizer" / name, tmp / name)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    size = sum(f.stat().st_size for f in dest.iterdir())
    print(f"{ckpt} -> {dest} ({size:,} bytes)")
    return dest


# ---------------------------------------------------------------------------------------------- report
def held_out_windows(out: Path, tok, seq_len: int) -> torch.Tensor:
    """Every held-out file as [BOS] bytes [EOS], cut into non-overlapping windows of seq_len + 1 tokens."""
    rows = []
    for line in (out / "data" / "heldout.jsonl").read_text(encoding="utf-8").splitlines():
        ids = [tok.bos_id, *tok.encode(json.loads(line)["text"], add_bos=False), tok.eos_id]
        rows += [ids[i : i + seq_len + 1] for i in range(0, len(ids) - seq_len, seq_len)]
    return torch.tensor(rows)


@torch.no_grad()
def eval_model(model, windows: torch.Tensor, batch: int = 16) -> dict:
    """Mean next-token loss (nats/token), argmax per position, and MaxVio of the routers on `windows`."""
    from dsv3.training.balance import max_violation, moe_routers, reset_expert_counts, take_expert_counts

    routers = [r for _, r in moe_routers(model)]
    for r in routers:
        r.train()  # the routers count tokens per expert only in training mode; nothing else changes
    reset_expert_counts(routers)
    total, n, argmax = 0.0, 0, []
    for i in range(0, len(windows), batch):
        ids = windows[i : i + batch]
        logits = model(ids[:, :-1]).float()
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        ).item()
        n += ids[:, 1:].numel()
        argmax.append(logits.argmax(-1))
    counts = take_expert_counts(routers[: model.config.num_hidden_layers - model.config.first_k_dense_replace])
    for r in routers:
        r.eval()
    return {
        "loss": total / n,
        "targets": n,
        "argmax": torch.cat(argmax),
        "maxvio_per_layer": [round(v, 3) for v in max_violation(counts).tolist()],
        "load_per_layer": counts.tolist(),
    }


def unigram_cross_entropy(out: Path, windows: torch.Tensor, vocab: int) -> tuple[float, float]:
    """(entropy of the held-out targets' own byte distribution, cross-entropy under the training distribution)."""
    train = torch.zeros(vocab, dtype=torch.float64)
    with open(out / "data" / "train.jsonl", encoding="utf-8") as f:
        for line in f:
            data = json.loads(line)["text"].encode("utf-8")
            train[2:258] += torch.bincount(torch.frombuffer(bytearray(data), dtype=torch.uint8).long(), minlength=256)
            train[1] += 1  # each document's EOS
    targets = windows[:, 1:].reshape(-1)
    own = torch.bincount(targets, minlength=vocab).double()
    p_own = own[own > 0] / own.sum()
    p_train = (train + 1) / (train + 1).sum()  # add-one: a byte unseen in training still gets a probability
    return float(-(p_own * p_own.log()).sum()), float(-p_train.log()[targets].mean())


def _timed(fn) -> tuple[object, float]:
    import time

    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def speculative_report(model, windows: torch.Tensor, new_tokens: int = 96) -> dict:
    """MTP acceptance and wall time of speculative vs plain greedy decoding, batch 1 and 4 (prompts: held-out)."""
    import dsv3
    from dsv3.inference.speculative import SpeculativeStats, speculative_stream

    prompts = [windows[i, :64].tolist() for i in torch.linspace(0, len(windows) - 1, 8).long()]
    report = {}
    for batch in (1, 4):
        groups = [prompts[i : i + batch] for i in range(0, 8, batch)]
        dsv3.generate(model, groups[0], max_new_tokens=4)  # warm-up
        plain_t = spec_t = 0.0
        stats = SpeculativeStats()
        same = True
        for g in groups:
            plain, dt = _timed(lambda g=g: dsv3.generate(model, g, max_new_tokens=new_tokens))
            plain_t += dt

            def spec(g=g, stats=stats):
                rows = [[] for _ in g]
                for step in speculative_stream(model, g, new_tokens, stats=stats):
                    for b, toks in step.items():
                        rows[b].extend(toks)
                return rows

            rows, dt = _timed(spec)
            spec_t += dt
            same &= rows == plain
        report[f"batch{batch}"] = {
            "acceptance_rate": round(stats.acceptance_rate, 3),
            "tokens_per_verification": round(stats.tokens_per_step, 3),
            "plain_s": round(plain_t, 2),
            "speculative_s": round(spec_t, 2),
            "speedup": round(plain_t / spec_t, 2),
            "identical_greedy_output": same,
        }
    return report


SAMPLE_PROMPTS = ("def fibonacci(n):\n", "import os\n\n\ndef ", "class Stack:\n    ", "    for line in f")
SAMPLE_CHATS = ("What does json.dumps do?", "What is the collections module for?", "Explain os.path.join.")


def samples(model, tok) -> dict:
    import dsv3

    out = {}
    limit = 260
    for p in SAMPLE_PROMPTS:
        ids = dsv3.generate(model, [tok.encode(p, add_bos=True)], max_new_tokens=200)[0]
        out[p] = p + tok.decode([i for i in ids if i < limit], skip_special_tokens=True)
    for q in SAMPLE_CHATS:
        prompt = tok.encode_chat([{"role": "user", "content": q}])
        ids = dsv3.generate(model, [prompt], max_new_tokens=300)[0]
        out[f"chat: {q}"] = tok.decode([i for i in ids if i < limit], skip_special_tokens=True)
    return out


TEST_REFERENCE = REPO / "tests" / "data" / "stdlib_mini_reference.json"


@torch.no_grad()
def write_test_reference(bf16, windows: torch.Tensor) -> None:
    """4 held-out windows of 257 tokens with the bf16 (unquantized) model's loss and argmax on them: the
    test compares the shipped FP8 model against this model, which is not shipped."""
    rows = windows[torch.linspace(0, len(windows) - 1, 4).long(), :257]
    logits = bf16(rows[:, :-1]).float()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1)).item()
    ref = {
        "about": "held-out stdlib windows and the bf16 model's loss/argmax on them, by "
        "scripts/train_default_model.py report (the shipped model is this model in FP8)",
        "bf16_loss": loss,
        "windows": rows.tolist(),
        "bf16_argmax": logits.argmax(-1).tolist(),
    }
    TEST_REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    TEST_REFERENCE.write_text(json.dumps(ref, separators=(",", ":")) + "\n")


def report(out: Path, dest: Path = ASSET, max_windows: int | None = None) -> dict:
    """Held-out loss (fp32, bf16, FP8 as shipped) against the unigram baselines, greedy agreement, MaxVio,
    MTP acceptance and speed-up, samples; written to out/report.json."""
    import dsv3
    from dsv3.tokenizer import Tokenizer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    tok = Tokenizer.from_dir(dest)
    ckpt = latest_checkpoint(out)
    fp32 = dsv3.DeepSeekV3.from_pretrained(ckpt, dtype=torch.float32).eval()
    bf16 = dsv3.DeepSeekV3.from_pretrained(ckpt, dtype=torch.bfloat16).eval()
    fp8 = dsv3.DeepSeekV3.from_pretrained(dest, dtype=torch.bfloat16).eval()
    windows = held_out_windows(out, tok, fp32.config.max_position_embeddings)[:max_windows]
    write_test_reference(bf16, windows)
    own, cross = unigram_cross_entropy(out, windows, fp32.config.vocab_size)
    evals = {name: eval_model(m, windows) for name, m in (("fp32", fp32), ("bf16", bf16), ("fp8", fp8))}
    result = {
        "checkpoint": str(ckpt),
        "held_out": {"windows": len(windows), "targets": evals["fp32"]["targets"]},
        "unigram_entropy_held_out": round(own, 4),
        "unigram_cross_entropy_from_train": round(cross, 4),
        "loss": {k: round(v["loss"], 4) for k, v in evals.items()},
        "argmax_agreement_fp8_vs_bf16": round(
            (evals["fp8"]["argmax"] == evals["bf16"]["argmax"]).float().mean().item(), 4
        ),
        "argmax_agreement_bf16_vs_fp32": round(
            (evals["bf16"]["argmax"] == evals["fp32"]["argmax"]).float().mean().item(), 4
        ),
        "maxvio_held_out_fp8": evals["fp8"]["maxvio_per_layer"],
        "load_held_out_fp8": evals["fp8"]["load_per_layer"],
    }
    prompts = [windows[i, :64].tolist() for i in torch.linspace(0, len(windows) - 1, 16).long()]
    g16 = dsv3.generate(bf16, prompts, max_new_tokens=64)
    g8 = dsv3.generate(fp8, prompts, max_new_tokens=64)
    result["greedy_64_tokens_identical_fp8_vs_bf16"] = sum(a == b for a, b in zip(g16, g8))
    result["greedy_16_prompts"] = len(prompts)
    result["greedy_tokens_before_divergence_fp8_vs_bf16"] = [
        next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))) for a, b in zip(g16, g8)
    ]
    result["speculative_fp8"] = speculative_report(fp8, windows)
    result["samples_fp8"] = samples(fp8, tok)
    (out / "report.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=("data", "train", "ship", "report", "all"))
    p.add_argument("--out", required=True, type=Path, help="work folder (data/, tokenizer/, run/)")
    p.add_argument("--eval-windows", type=int, default=None, help="report: only the first N held-out windows")
    args = p.parse_args(argv)
    out = args.out.resolve()
    if args.stage in ("data", "all"):
        print(json.dumps(build_data(out), indent=2))
    if args.stage in ("train", "all"):
        cmd = train_command(out)
        # One thread: on 2 cores shared with other jobs, two OpenMP threads ran 3-5x slower than one
        # (measured, docs/training.md); the losses do not depend on it.
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        print(f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']} " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env=env)
    if args.stage in ("ship", "all"):
        ship(out)
    if args.stage in ("report", "all"):
        print(json.dumps(report(out, max_windows=args.eval_windows), indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
