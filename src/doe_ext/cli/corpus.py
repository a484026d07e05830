"""``doe-ext corpus build``: text → token-id shards (streaming, any Hugging Face tokenizer)."""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

from doe_ext.cli import CommandError, count, input_file, output_folder, positive_int


def register(sub) -> None:
    p = sub.add_parser("corpus", help="token corpus shards")
    cmds = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    b = cmds.add_parser("build", help="tokenize text files / JSONL / a `datasets` dataset into shards",
                        description="Tokenize documents into doe_ext corpus shards (uint32 token ids, "
                                    "int64 offsets, meta.json), streaming with bounded memory.")
    b.add_argument("inputs", nargs="*", type=input_file, help="text or JSONL files (.gz/.dz read transparently)")
    b.add_argument("--out", required=True, type=output_folder, help="shard folder (or folder of shards with --shard-tokens)")
    tok = b.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", help="a tokenizer.json, a folder holding one, or a Hugging Face "
                                         "tokenizer name/folder (needs transformers)")
    tok.add_argument("--train-bpe", type=positive_int, metavar="VOCAB_SIZE",
                     help="train a byte-level BPE tokenizer of this size on the inputs first "
                          "(saved as OUT/tokenizer.json)")
    b.add_argument("--format", choices=("auto", "text", "jsonl"), default="auto",
                   help="input format (auto: .jsonl/.json files are JSONL)")
    b.add_argument("--text-field", default="text", help="JSONL / dataset field holding the text")
    b.add_argument("--doc-per", choices=("paragraph", "line", "file"), default="paragraph",
                   help="how plain text splits into documents (paragraph: blank-line separated)")
    b.add_argument("--dataset", help="a `datasets` dataset name/path, read in streaming mode")
    b.add_argument("--split", default="train", help="dataset split")
    b.add_argument("--shard-tokens", type=count, default=0,
                   help="start a new shard after this many tokens (0: one shard)")
    b.add_argument("--min-tokens", type=count, default=1, help="drop documents shorter than this")
    b.add_argument("--batch-docs", type=positive_int, default=1000, help="documents tokenized per batch")
    b.add_argument("--overwrite", action="store_true", help="replace an existing output")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=build)


def _open_text(path: Path):
    if path.suffix in (".gz", ".dz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def iter_documents(inputs: list[str], fmt: str, field: str, doc_per: str) -> Iterator[str]:
    for name in inputs:
        path = Path(name)
        if not path.is_file():
            raise CommandError(f"{path}: no such input file")
        stem_suffixes = [s for s in path.suffixes if s not in (".gz", ".dz")]
        is_jsonl = fmt == "jsonl" or (fmt == "auto" and stem_suffixes[-1:] in ([".jsonl"], [".json"]))
        with _open_text(path) as f:
            if is_jsonl:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)[field]
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise CommandError(f"{path}:{lineno}: not a JSON object with a {field!r} "
                                           f"field ({e})") from e
                    yield str(text)
            elif doc_per == "file":
                yield f.read()
            elif doc_per == "line":
                yield from (line for line in f if line.strip())
            else:
                para: list[str] = []
                for line in f:
                    if line.strip():
                        para.append(line)
                    elif para:
                        yield "".join(para)
                        para = []
                if para:
                    yield "".join(para)


def iter_dataset(name: str, split: str, field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError as e:
        raise CommandError("--dataset needs the `datasets` package (pip install datasets)") from e
    for row in datasets.load_dataset(name, split=split, streaming=True):
        yield str(row[field])


class Tokenizer:
    """A uniform batch-encode view of a `tokenizers.Tokenizer` or a transformers tokenizer."""

    def __init__(self, name: str, encode_batch, vocab_size: int, special_ids: list[int]):
        self.name, self.encode_batch, self.vocab_size, self.special_ids = name, encode_batch, vocab_size, special_ids


def from_tokenizers(tk, name: str) -> Tokenizer:
    special = sorted(i for i, t in tk.get_added_tokens_decoder().items() if t.special)
    return Tokenizer(name, lambda texts: [e.ids for e in tk.encode_batch(texts, add_special_tokens=False)],
                     tk.get_vocab_size(with_added_tokens=True), special)


def load_tokenizer(spec: str) -> Tokenizer:
    path = Path(spec)
    if path.is_dir() and (path / "tokenizer.json").is_file():
        path = path / "tokenizer.json"
    if path.is_file():
        from tokenizers import Tokenizer as HFTokenizer
        try:
            return from_tokenizers(HFTokenizer.from_file(str(path)), str(path.resolve()))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise CommandError(f"{path}: not a tokenizers tokenizer.json ({e})") from e
    if path.suffix == ".json" or os.sep in spec and not path.exists():
        raise CommandError(f"{spec}: no such tokenizer file")
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise CommandError(f"{spec}: no such tokenizer file; loading a Hugging Face tokenizer by "
                           f"name needs transformers (pip install transformers)") from e
    try:
        tk = AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as e:
        raise CommandError(f"{spec}: cannot load a Hugging Face tokenizer: {e}") from e
    return Tokenizer(spec, lambda texts: tk(texts, add_special_tokens=False)["input_ids"],
                     len(tk), sorted(set(tk.all_special_ids)))


def train_bpe(docs: Iterable[str], vocab_size: int, out: Path, progress: bool) -> Tokenizer:
    """A byte-level BPE (GPT-2 style) trained on ``docs``, saved as ``out/tokenizer.json``."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=progress)
    tk.train_from_iterator(docs, trainer=trainer)
    out.mkdir(parents=True, exist_ok=True)
    tk.save(str(out / "tokenizer.json"))
    return from_tokenizers(tk, str((out / "tokenizer.json").resolve()))


def _batches(docs: Iterator[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for d in docs:
        batch.append(d)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def build(args) -> None:
    from tqdm.auto import tqdm

    from doe_ext.lda.corpus import CorpusWriter

    if not args.inputs and not args.dataset:
        raise CommandError("corpus build: give input files or --dataset")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise CommandError(f"{out}: already exists (use --overwrite)")

    def docs() -> Iterator[str]:
        if args.dataset:
            yield from iter_dataset(args.dataset, args.split, args.text_field)
        yield from iter_documents(args.inputs, args.format, args.text_field, args.doc_per)

    progress = not args.no_progress
    if args.train_bpe:
        # Trained beside the output and moved in once the shards are complete.
        trained = out.with_name(out.name + ".tokenizer")
        tok = train_bpe(docs(), args.train_bpe, trained, progress)
        tok.name = str((out / "tokenizer.json").resolve())
    else:
        tok = load_tokenizer(args.tokenizer)
    meta = {"special_token_ids": tok.special_ids}
    sharded = args.shard_tokens > 0
    shard_index, writer, shards = 0, None, []

    def new_writer():
        nonlocal shard_index
        path = out / f"shard-{shard_index:05d}" if sharded else out
        shard_index += 1
        shards.append(path)
        return CorpusWriter(path, tok.vocab_size, tokenizer=tok.name, overwrite=True, extra_meta=meta)

    docs_done = tokens_done = 0
    try:
        with tqdm(desc="corpus build", unit="doc", disable=not progress) as bar:
            for batch in _batches(docs(), args.batch_docs):
                for ids in tok.encode_batch(batch):
                    if len(ids) < args.min_tokens:
                        continue
                    if writer is None or (sharded and writer.num_tokens >= args.shard_tokens):
                        if writer is not None:
                            writer.close()
                        writer = new_writer()
                    writer.add(ids)
                    docs_done += 1
                    tokens_done += len(ids)
                bar.update(len(batch))
                bar.set_postfix(tokens=tokens_done)
        if writer is None:
            raise CommandError("corpus build: the inputs hold no document "
                               f"with at least {args.min_tokens} tokens")
        writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if args.train_bpe:
        os.replace(trained / "tokenizer.json", out / "tokenizer.json")
        trained.rmdir()
    print(f"wrote {docs_done} documents, {tokens_done} tokens, vocab size {tok.vocab_size} "
          f"into {len(shards)} shard(s) under {out}")
