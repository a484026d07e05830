"""``doe-ext dmoe build | ask | eval | add | rm | ls | reader``: DMoE expert banks (docs/design.md#dmoe)."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from doe_ext import threads
from doe_ext.cli import (CommandError, count, fraction, input_file, input_folder, number, output_file, output_folder,
                         positive_float, positive_int)

# --tau: an entropy threshold; 0 triggers wherever the entropy is above 0, inf never triggers.
tau = number(float, 0.0, what=" (inf: never trigger)")


def instance_kinds(text: str) -> tuple[str, ...]:
    """--instances: comma-separated kinds of distillation instances (doe_ext.dmoe.recipe.INSTANCE_KINDS)."""
    from doe_ext.dmoe.recipe import INSTANCE_KINDS

    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    bad = [k for k in kinds if k not in INSTANCE_KINDS]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(f"expected kinds from {', '.join(INSTANCE_KINDS)}, got {text!r}")
    return kinds


def register(sub) -> None:
    from doe_ext.dmoe.recipe import AUGMENTATIONS, INSTANCE_KINDS, OBJECTIVES, RECIPES, SFT_DOCS_PER_STEP
    from doe_ext.dmoe.routing import COMPOSITIONS, DEFAULT_COMPOSE, DEFAULT_TEMPERATURE

    p = sub.add_parser("dmoe", help="DMoE: build an expert bank, ask questions, add / remove experts")
    cmds = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def threads_arg(c):
        c.add_argument("--threads", type=positive_int, default=None, metavar="N",
                       help="torch threads (default: $DOE_EXT_NUM_THREADS, else the cores not busy when it starts)")

    def run_args(c):
        threads_arg(c)
        c.add_argument("--group-size", type=positive_int, default=32, help="documents augmented and trained together")
        c.add_argument("--ray", type=count, default=0, metavar="N", help="train on N Ray workers")
        c.add_argument("--ray-address", default=None, help="Ray cluster address (e.g. auto)")
        c.add_argument("--no-progress", action="store_true")

    def routing_args(c):
        threads_arg(c)
        c.add_argument("--tau", type=tau, default=2.0, help="trigger threshold on token entropy (inf: never)")
        c.add_argument("--top-k", type=positive_int, default=3, help="experts per trigger")
        c.add_argument("--compose", choices=COMPOSITIONS, default=DEFAULT_COMPOSE,
                       help="how the top-k experts combine: sum (the paper's eq. 6), mean, score (softmax of the "
                            "BM25 scores over --temperature; the default, chosen on our dev split) or top1")
        c.add_argument("--temperature", type=positive_float, default=DEFAULT_TEMPERATURE,
                       help="the score composition's softmax temperature (BM25 score units)")
        c.add_argument("--max-new-tokens", type=positive_int, default=32)
        c.add_argument("--base", default=None, help="base model (default: the one the bank was built with)")
        c.add_argument("--no-reader", action="store_true",
                       help="leave the bank's knowledge reader out (it joins the experts wherever they fire)")

    b = cmds.add_parser("build", help="train one expert per document of DOCS.jsonl into a bank (resumable)")
    b.add_argument("docs", type=input_file, help='JSON lines: {"id": str, "text": str} and an optional "title": str')
    b.add_argument("--out", required=True, type=output_folder, help="bank directory")
    b.add_argument("--base", default="smollm2-135m", help="smollm2-135m, a .gguf file or a model directory")
    b.add_argument("--recipe", choices=sorted(RECIPES), default="default",
                   help="default: context distillation, the best on our dev split; paper: the DMoE paper's "
                        "next-token recipe. The options below change single fields of it")
    b.add_argument("--objective", choices=OBJECTIVES, default=None, help="training objective")
    b.add_argument("--rank", type=positive_int, default=None)
    b.add_argument("--alpha", type=positive_float, default=None)
    b.add_argument("--epochs", type=positive_int, default=None, help="passes over each document's instances")
    b.add_argument("--lr", type=positive_float, default=None, help="AdamW learning rate")
    b.add_argument("--augment", choices=AUGMENTATIONS, default=None,
                   help="model: the base writes a rewrite and three QA pairs per document (App. C); qa: the base "
                        "writes up to four QA pairs as plain lines after one worked example; sentences: one question "
                        "about each sentence; none: the document alone")
    b.add_argument("--instances", type=instance_kinds, default=None, metavar="KIND,...",
                   help="the distill objective's instances, comma-separated from "
                        f"{', '.join(INSTANCE_KINDS)} (default recipe: subject,questions; 'shuffled' adds the "
                        "document four times in shuffled sentence order)")
    b.add_argument("--seed", type=int, default=None)
    b.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="weights on disk")
    b.add_argument("--no-reader", action="store_true",
                   help="do not install the knowledge reader the package ships for this base and recipe")
    run_args(b)
    b.set_defaults(func=build)

    a = cmds.add_parser("add", help="add (or replace) experts for the documents of DOCS.jsonl, with the bank's recipe")
    a.add_argument("bank", type=input_folder)
    a.add_argument("docs", type=input_file)
    run_args(a)
    a.set_defaults(func=add)

    q = cmds.add_parser("ask", help="answer a question with the bank's experts")
    q.add_argument("bank", type=input_folder)
    q.add_argument("question")
    routing_args(q)
    q.add_argument("--json", action="store_true", help='print {"answer": ..., "triggers": [...]}')
    q.set_defaults(func=ask)

    e = cmds.add_parser("eval", help="evaluate methods on QA.jsonl: EM / F1 with 95%% intervals, latency, memory")
    e.add_argument("bank", type=input_folder)
    e.add_argument("questions", type=input_file, help='JSON lines: {"question": str, "answers": [str, ...]} (doc_id for gold)')
    e.add_argument("--methods", default="base,rag,prag,sft,flare,dmoe",
                   help="comma-separated: base, gold (the question's own document in the prompt; needs doc_id), "
                        "rag, prag, sft, flare, dmoe, reader (the bank's knowledge reader alone: a control)")
    e.add_argument("--out", default=None, type=output_folder, help="directory for eval.json and eval.md")
    routing_args(e)
    e.add_argument("--limit", type=positive_int, default=None, help="first N questions only")
    e.add_argument("--shots", default=None, type=input_file,
                   help="JSON lines of demonstrations (question, answers, and doc_id or passage): a plain few-shot "
                        "prompt instead of the chat template")
    e.add_argument("--batch-size", type=positive_int, default=16, help="questions answered together")
    e.add_argument("--sft-docs-per-step", type=positive_int, default=SFT_DOCS_PER_STEP, metavar="N",
                   help="the sft method's adapter: N times the recipe's batch per optimizer step "
                        "(default: %(default)s)")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=eval_)

    rd = cmds.add_parser("reader", help="the knowledge reader: one LoRA shared by a bank's experts (train, add, rm)")
    rcmds = rd.add_subparsers(dest="reader_command", metavar="COMMAND", required=True)
    rt = rcmds.add_parser("train", help="train a reader on a bank of train-split documents and questions about them")
    rt.add_argument("bank", type=input_folder, help="a bank of experts of the train split (never of dev or test documents)")
    rt.add_argument("questions", type=input_file, help='JSON lines: {"question": str, "answers": [str, ...], "doc_id": str}')
    rt.add_argument("--out", required=True, type=output_file, help="the reader's file (.safetensors)")
    rt.add_argument("--split", default=None, help="only the questions whose \"split\" is this (e.g. train)")
    rt.add_argument("--name", default=None, help="the reader's name (default: the file's stem)")
    rt.add_argument("--shots", default=None, type=input_file,
                    help="JSON lines of demonstrations, as for eval --shots: train in the prompt eval asks with them "
                         "(default: the layout the bank's experts were trained in)")
    rt.add_argument("--rank", type=positive_int, default=None)
    rt.add_argument("--alpha", type=positive_float, default=None)
    rt.add_argument("--epochs", type=positive_int, default=None, help="passes over the questions")
    rt.add_argument("--lr", type=positive_float, default=None, help="AdamW learning rate")
    rt.add_argument("--top-k", type=positive_int, default=None, help="experts per question: the gold one and BM25's best others")
    rt.add_argument("--with-document", type=fraction, default=None,
                    help="the share of questions whose prompt also holds the routed documents")
    rt.add_argument("--seed", type=int, default=None)
    threads_arg(rt)
    rt.add_argument("--no-progress", action="store_true")
    rt.set_defaults(func=reader_train)
    ra = rcmds.add_parser("add", help="give a bank a reader (refused if it was trained for another base or recipe)")
    ra.add_argument("bank", type=input_folder)
    ra.add_argument("reader", type=input_file, help="a reader file from `doe-ext dmoe reader train`")
    ra.set_defaults(func=reader_add)
    rr = rcmds.add_parser("rm", help="remove a bank's reader")
    rr.add_argument("bank", type=input_folder)
    rr.set_defaults(func=reader_rm)

    r = cmds.add_parser("rm", help="remove experts by id")
    r.add_argument("bank", type=input_folder)
    r.add_argument("ids", nargs="+")
    r.set_defaults(func=rm)

    ls_ = cmds.add_parser("ls", help="list the experts of a bank")
    ls_.add_argument("bank", type=input_folder)
    ls_.add_argument("--json", action="store_true", help="one JSON object per expert")
    ls_.set_defaults(func=ls)


def _open(path: str):
    from doe_ext.dmoe import ExpertBank

    return ExpertBank(path)


def _train(args, docs, base, bank, replace: bool) -> list[str]:
    from doe_ext.dmoe import build_bank

    if args.ray:
        from doe_ext.dmoe.distributed import build_bank_ray

        if replace:
            bank.remove([d.id for d in docs if d.id in bank])
        return build_bank_ray(bank.base_name, base.fingerprint, docs, bank, args.ray, args.group_size,
                              args.ray_address, progress=not args.no_progress)
    return build_bank(base, docs, bank, args.group_size, replace=replace, progress=not args.no_progress)


def recipe_from(args):
    """The recipe ``build`` asks for: the named one, with the fields given on the command line changed."""
    from doe_ext.dmoe import RECIPES, LoRAConfig

    recipe = RECIPES[args.recipe]
    if args.objective == "next_token":
        recipe = recipe.next_token()  # the distill-only fields go with the objective
    fields = {k: getattr(args, k) for k in ("objective", "epochs", "lr", "augment", "instances", "seed")
              if getattr(args, k) is not None}
    if args.rank is not None or args.alpha is not None:
        fields["lora"] = LoRAConfig(args.rank or recipe.lora.rank, args.alpha or recipe.lora.alpha)
    return recipe.replace(**fields)


def build(args) -> None:
    threads.configure(args.threads, claim=True)
    from doe_ext.dmoe import ExpertBank, load_base, read_documents

    out = Path(args.out)
    docs = read_documents(args.docs)  # its errors before the base loads and before a bank folder is made
    recipe = recipe_from(args)
    base_name = str(Path(args.base).resolve()) if Path(args.base).exists() else args.base
    base = load_base(base_name)
    # create=True also opens an existing bank (a resumed build), after checking it was made the same way.
    with ExpertBank(out, create=True, fingerprint=base.fingerprint, base_name=base_name, recipe=recipe,
                    dtype=args.dtype) as bank:
        if bank.base_name != base_name:
            raise CommandError(f"{out}: the bank was built with --base {bank.base_name}, not {base_name}")
        done = _train(args, docs, base, bank, replace=False)
        print(f"{out}: {len(done)} experts trained, {len(bank)} in the bank")
        if not args.no_reader and bank.reader() is None:
            from doe_ext.dmoe.reader import shipped_reader

            reader = shipped_reader(bank.fingerprint, bank.recipe)
            if reader is not None:
                bank.set_reader(reader)
                print(f"{out}: knowledge reader {reader.name!r} installed (shipped with doe_ext; --no-reader: none)")


def add(args) -> None:
    threads.configure(args.threads, claim=True)
    from doe_ext.dmoe import load_base, read_documents

    docs = read_documents(args.docs)
    with _open(args.bank) as bank:
        done = _train(args, docs, load_base(bank.base_name), bank, replace=True)
        print(f"{args.bank}: {len(done)} experts added, {len(bank)} in the bank")


def ask(args) -> None:
    threads.configure(args.threads, claim=True)
    from doe_ext.dmoe import DMoE, load_base

    with _open(args.bank) as bank:
        base = load_base(args.base or bank.base_name)
        g = DMoE(base, bank, tau=args.tau, top_k=args.top_k, compose=args.compose, temperature=args.temperature,
                 reader=not args.no_reader).ask(args.question, max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps(g.to_dict(), ensure_ascii=False))
    else:
        print(g.text)
        for t in g.triggers:
            print(f"  [trigger] position {t.position}  entropy {t.entropy:.3f}  experts {', '.join(t.experts)}")


def eval_(args) -> None:
    threads.configure(args.threads, claim=True)
    from doe_ext.dmoe import load_base
    from doe_ext.dmoe.build import sft_bank
    from doe_ext.dmoe.evaluate import (Harness, check_methods, evaluate, markdown, read_questions, read_shots,
                                       summarize, write)

    methods = check_methods([m.strip() for m in args.methods.split(",") if m.strip()])
    questions = read_questions(args.questions)[:args.limit]
    with _open(args.bank) as bank:
        shots = read_shots(args.shots, bank) if args.shots else ()
        base = load_base(args.base or bank.base_name)
        sft = sft_bank(base, bank, args.sft_docs_per_step, not args.no_progress) if "sft" in methods else None
        harness = Harness(base, bank, shots=shots, top_k=args.top_k, tau=args.tau,
                          max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, compose=args.compose,
                          temperature=args.temperature, sft=sft, reader=not args.no_reader)
        results = evaluate(harness, questions, methods, progress=not args.no_progress)
    summary = summarize(results)
    print(markdown(summary), end="")
    if args.out:
        write(results, summary, args.out)
        print(f"wrote {Path(args.out) / 'eval.json'} and eval.md")


def reader_train(args) -> None:
    threads.configure(args.threads, claim=True)
    from doe_ext.dmoe import LoRAConfig, load_base
    from doe_ext.dmoe.evaluate import read_questions, read_shots
    from doe_ext.dmoe.reader import ReaderRecipe
    from doe_ext.dmoe.reader_training import train_reader

    questions = [q for q in read_questions(args.questions) if args.split is None or q.get("split") == args.split]
    if not questions:
        raise CommandError(f"{args.questions}: no questions" + (f" of split {args.split!r}" if args.split else ""))
    rr = ReaderRecipe()
    fields = {k: getattr(args, k) for k in ("epochs", "lr", "top_k", "with_document", "seed")
              if getattr(args, k) is not None}
    if args.rank is not None or args.alpha is not None:
        fields["lora"] = LoRAConfig(args.rank or rr.lora.rank, args.alpha or rr.lora.alpha)
    rr = dataclasses.replace(rr, **fields)
    with _open(args.bank) as bank:
        shots = read_shots(args.shots, bank) if args.shots else None
        reader = train_reader(load_base(bank.base_name), bank, questions, rr, name=args.name or Path(args.out).stem,
                              progress=not args.no_progress, shots=shots)
    reader.save(args.out)
    print(f"{args.out}: reader {reader.name!r} trained on {reader.info['questions']} questions about "
          f"{reader.info['documents']} documents in {reader.info['seconds']} s")


def reader_add(args) -> None:
    from doe_ext.dmoe.reader import Reader

    reader = Reader.load(args.reader)
    with _open(args.bank) as bank:
        bank.set_reader(reader)
        print(f"{args.bank}: knowledge reader {reader.name!r} installed")


def reader_rm(args) -> None:
    with _open(args.bank) as bank:
        print(f"{args.bank}: " + ("reader removed" if bank.remove_reader() else "no reader to remove"))


def rm(args) -> None:
    with _open(args.bank) as bank:
        missing = [i for i in args.ids if i not in bank]
        if missing:
            raise CommandError(f"{args.bank}: no expert with id {', '.join(map(repr, missing))}")
        bank.remove(args.ids)
        print(f"{args.bank}: removed {len(args.ids)}, {len(bank)} left")


def ls(args) -> None:
    with _open(args.bank) as bank:
        rows = bank.rows()
        if args.json:
            for r in rows:
                print(json.dumps({"id": r.id, "loss": r.loss, "checksum": r.checksum, "file": r.file,
                                  "text": r.text}, ensure_ascii=False))
            return
        print(repr(bank))
        for r in rows:
            loss = "-" if r.loss is None else f"{r.loss:.4f}"
            text = r.text if len(r.text) <= 60 else r.text[:57] + "..."
            print(f"{r.id}\tloss {loss}\t{text}")
