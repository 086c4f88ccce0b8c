"""Corpus -> tokenizer -> packed fixed-length blocks, with a held-out validation split.

Text comes through ``datasets`` (text / JSON lines / a dataset saved to disk); tokens through a
sentencepiece model read by transformers' ``AutoTokenizer`` -- the user's Llama-2 tokenizer, or one
trained here on the corpus. Packing concatenates documents with EOS between them and cuts blocks of
``seq_len``; every k-th block is held out, so validation follows the training distribution without
sharing a block with it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sysconfig
import tokenize
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, DataConfig

CACHE_DIR = Path(os.environ.get("DS_ACCEL_CACHE", Path.home() / ".cache" / "ds_accel"))
KJV_RANGE = "Gen1:1-Rev22:21"
STDLIB_SKIP = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


def bundled_corpus() -> Path:
    """The King James Bible (public domain) from Debian's ``bible-kjv`` package, written once to the cache.

    The package ships the text in a compressed index that only its ``bible`` command reads, so the
    verses are printed through it; the verse references are kept (they read like line numbers).
    """
    target = CACHE_DIR / "kjv.txt"
    if target.is_file() and target.stat().st_size > 0:
        return target
    if shutil.which("bible") is None:
        raise ConfigError("data.train_files: empty, and the bundled corpus needs Debian's bible-kjv package; "
                          "run `make setup` (apt-get install bible-kjv) or give data.train_files")
    text = subprocess.run(["bible", "-f", KJV_RANGE], check=True, capture_output=True, text=True).stdout
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(target)
    return target


def stdlib_corpus(root: Path | None = None) -> list[str]:
    """The running interpreter's standard library as documents, one ``.py`` file each: a second domain
    (source code) on every machine without a download, for continual pretraining away from the KJV.

    Chosen: every ``.py`` file under ``sysconfig``'s stdlib directory (or ``root``), except what lies
    under ``site-packages`` / ``dist-packages`` (third-party code) and the test suites (``test``,
    ``tests``, ``idle_test`` directories), read with its declared encoding (``tokenize.open``).
    Ordered by the SHA-256 of the relative path, a fixed shuffle, so a ``max_chars`` prefix samples the
    whole library rather than its first packages alphabetically. The held-out split is the usual one
    (:func:`split_blocks`). The text differs between Python versions: results name the version.
    """
    root = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in STDLIB_SKIP]
        files += [Path(folder, n).relative_to(root).as_posix() for n in names if n.endswith(".py")]
    texts = []
    for name in sorted(files, key=lambda n: hashlib.sha256(n.encode()).hexdigest()):
        with tokenize.open(root / name) as source:
            texts.append(source.read())
    return texts


def load_texts(cfg: DataConfig) -> list[str]:
    """Documents (strings) from the configured files, or the bundled corpus (``data.corpus``)."""
    import datasets

    if not cfg.train_files and cfg.corpus == "stdlib":
        return _truncate([t for t in stdlib_corpus() if t.strip()], cfg.max_chars)
    files = cfg.train_files or [str(bundled_corpus())]
    texts: list[str] = []
    for path in files:
        p = Path(path)
        if p.is_dir():
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        elif p.suffix in (".json", ".jsonl"):
            ds = datasets.load_dataset("json", data_files=str(p), split="train")
        else:
            ds = datasets.load_dataset("text", data_files=str(p), split="train")
        if cfg.text_field not in ds.column_names:
            raise ConfigError(f"data.text_field: {path} has no column {cfg.text_field!r} "
                              f"(columns: {', '.join(ds.column_names)}); set data.text_field")
        texts.extend(t for t in ds[cfg.text_field] if t and t.strip())
    if not texts:
        raise ConfigError(f"data.train_files: {', '.join(files)} holds no text; give non-empty files")
    return _truncate(texts, cfg.max_chars)


def _truncate(texts: list[str], max_chars: int) -> list[str]:
    """The first documents up to ``max_chars`` characters (0: all)."""
    if not max_chars:
        return texts
    kept, size = [], 0
    for t in texts:
        if size >= max_chars:
            break
        kept.append(t)
        size += len(t) + 1
    return kept


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path) -> Path:
    """Train a byte-fallback BPE sentencepiece model (Llama-2's kind: unk 0, bos 1, eos 2, no pad)."""
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = out_dir / "corpus.txt"
    corpus.write_text("\n".join(texts))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out_dir / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        num_threads=1, minloglevel=2, train_extremely_large_corpus=False,
    )
    corpus.unlink()
    (out_dir / "tokenizer.vocab").unlink(missing_ok=True)
    return out_dir


def load_tokenizer(path: str | Path):
    """AutoTokenizer on a dir with tokenizer.model; BOS is only added when asked for (Llama-2 adds it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), add_bos_token=True, add_eos_token=False)


def tokenizer_for(cfg: DataConfig, texts: list[str]) -> Path:
    """The user's tokenizer dir, or one trained on this corpus (cached by corpus and vocab size)."""
    if cfg.tokenizer is not None:
        return Path(cfg.tokenizer)
    digest = hashlib.sha256()
    for t in texts:
        digest.update(t.encode())
    key = f"spm-{cfg.vocab_size}-{digest.hexdigest()[:16]}"
    target = CACHE_DIR / "tokenizers" / key
    if not (target / "tokenizer.model").is_file():
        tmp = target.with_name(key + f".tmp{os.getpid()}")
        train_tokenizer(texts, cfg.vocab_size, tmp)
        tmp.rename(target) if not target.exists() else shutil.rmtree(tmp)
    return target


def pack(ids_per_doc: list[list[int]], eos_id: int, seq_len: int) -> torch.Tensor:
    """Concatenate documents with EOS after each and cut [n_blocks, seq_len]; the ragged tail is dropped."""
    lengths = [len(x) + 1 for x in ids_per_doc]
    flat = np.empty(sum(lengths), dtype=np.int64)
    pos = 0
    for ids, n in zip(ids_per_doc, lengths):
        flat[pos:pos + n - 1] = ids
        flat[pos + n - 1] = eos_id
        pos += n
    n_blocks = len(flat) // seq_len
    if n_blocks == 0:
        raise ConfigError(f"data.seq_len: the corpus has {len(flat)} tokens, fewer than one block of "
                          f"{seq_len}; lower data.seq_len or give more text")
    return torch.from_numpy(flat[: n_blocks * seq_len].reshape(n_blocks, seq_len))


def split_blocks(blocks: torch.Tensor, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Every k-th block (k = round(1/val_fraction)) is validation: spread over the corpus, never shared."""
    every = max(2, round(1 / val_fraction))
    is_val = torch.arange(len(blocks)) % every == every - 1
    if not is_val.any():
        raise ConfigError(f"data.val_fraction: {len(blocks)} blocks leave none for validation; "
                          "give more text or lower data.seq_len")
    return blocks[~is_val], blocks[is_val]


@dataclass
class Corpus:
    train: torch.Tensor  # [n_train, seq_len] int64
    val: torch.Tensor  # [n_val, seq_len] int64
    tokenizer_dir: Path
    vocab_size: int
    bos_id: int
    eos_id: int


def prepare(cfg: DataConfig) -> Corpus:
    """Load, tokenize (cached as a tensor file per corpus/tokenizer/seq_len), pack and split."""
    texts = load_texts(cfg)
    tok_dir = tokenizer_for(cfg, texts)
    tokenizer = load_tokenizer(tok_dir)
    digest = hashlib.sha256(repr((len(texts), texts[0][:200], texts[-1][-200:], sum(map(len, texts)),
                                  str(tok_dir), cfg.seq_len, cfg.val_fraction)).encode()).hexdigest()[:16]
    cache = CACHE_DIR / "packed" / f"{digest}.pt"
    if cache.is_file():
        blocks = torch.load(cache)
    else:
        ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
        blocks = pack(ids, tokenizer.eos_token_id, cfg.seq_len)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        torch.save(blocks, tmp)
        tmp.replace(cache)
    train, val = split_blocks(blocks, cfg.val_fraction)
    return Corpus(train, val, tok_dir, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)


class BlockSampler:
    """Deterministic global batches: the order is a seeded permutation per epoch, so a resumed run
    (or a run on another number of ranks with the same global batch) sees exactly the same samples.

    Global batch ``step`` holds samples ``perm[step*G:(step+1)*G]`` (G = micro * accum * world);
    micro-step ``a`` of rank ``r`` takes the contiguous slice ``[(a*world + r)*micro, ... + micro)``.
    """

    def __init__(self, n_samples: int, micro: int, accum: int, world: int, seed: int):
        self.n, self.micro, self.accum, self.world, self.seed = n_samples, micro, accum, world, seed
        self.global_batch = micro * accum * world
        if self.global_batch > n_samples:
            raise ConfigError(f"optim.micro_batch_size: a global batch of {self.global_batch} blocks exceeds the "
                              f"{n_samples} training blocks; lower it or give more text")
        self.per_epoch = n_samples // self.global_batch
        self._perm_epoch, self._perm = -1, None

    def indices(self, step: int, micro_step: int, rank: int) -> torch.Tensor:
        epoch, within = divmod(step, self.per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        start = within * self.global_batch + (micro_step * self.world + rank) * self.micro
        return self._perm[start:start + self.micro]
