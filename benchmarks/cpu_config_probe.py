"""One-prompt CPU probe of a few configurations on the shipped testbed at its CPU size: time and PSNR vs dense.

Run from the repo root: `python benchmarks/cpu_config_probe.py > probe.log` (prints one JSON line at the end)."""
import json, time, torch
import dit_accel
from dit_accel.testbed import load_testbed_pipeline
from torchmetrics.functional.image import peak_signal_noise_ratio as psnr
torch.set_num_threads(2)
pipe = load_testbed_pipeline()
pipe.set_progress_bar_config(disable=True)
prompt = "a small red circle moving left and a blue star moving up on a striped background"
def run(**kw):
    h = dit_accel.apply(pipe, **kw) if kw else None
    t = time.perf_counter()
    out = pipe(prompt, num_frames=8, height=128, width=128, num_inference_steps=20, generator=torch.Generator().manual_seed(0), output_type="pt").frames
    dt = time.perf_counter() - t
    s = (h.stats_summary(), h.cache_summary()) if h else None
    if h: dit_accel.remove(pipe)
    return out, dt, s
ref, tref, _ = run()
res = {"dense": {"s": round(tref, 1)}}
for name, kw in [("taylor2", dict(cache="taylor")), ("draft1", dict(attention="draft")), ("fixed2", dict(cache="fixed"))]:
    out, dt, s = run(**kw)
    res[name] = {"s": round(dt, 1), "psnr": round(float(psnr(out.float(), ref.float(), data_range=1.0)), 2), "stats": s}
    print(name, res[name], flush=True)
print(json.dumps(res, default=str))
