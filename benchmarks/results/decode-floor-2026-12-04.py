"""benchmarks/bench_dmoe.py's decode-floor measurement alone (its 64-expert random bank), as run() builds it."""
import json, platform, shutil, tempfile, sys
from pathlib import Path
import torch
sys.path.insert(0, "/work/main")
from benchmarks.bench_dmoe import bench_decode_floor, debian_records, passage
from doe_ext.dmoe import ExpertBank, Recipe, load_base, qa_prompt

base = load_base("smollm2-135m")
passages = [(f["Package"], passage(f)) for f in debian_records(64)]
work = Path(tempfile.mkdtemp())
bank = ExpertBank(work / "bank", create=True, fingerprint=base.fingerprint, base_name="smollm2-135m", recipe=Recipe())
gen = torch.Generator().manual_seed(0)
for pkg, text in passages[:64]:
    e = {}
    for n, (o, i) in base.site.shapes().items():
        e[f"{n}.lora_a"] = torch.randn(4, i, generator=gen) / i ** 0.5
        e[f"{n}.lora_b"] = torch.randn(o, 4, generator=gen) * 1e-3
    bank.add(pkg, e, text, text)
tok = base.tokenizer
prompts = [qa_prompt(tok, f"What is the Debian package {pkg}?") for pkg, _ in passages[:8]]
print("prompt tokens", len(tok(prompts[0])["input_ids"]), "threads", torch.get_num_threads(), platform.processor())
for r in bench_decode_floor(base, bank, prompts[0]):
    print(json.dumps(r))
shutil.rmtree(work)
