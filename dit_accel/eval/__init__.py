"""Evaluation of dit-accel configurations: quality against dense, distribution metrics, VBench-style
video dimensions, speed, reports and quality-regression baselines.

    from dit_accel.eval import EvalSettings, builtin_prompts, evaluate, write_report
    report = evaluate(pipe, builtin_prompts(8), ["attention:draft", "cache:probe"], EvalSettings(num_inference_steps=20))
    write_report(report, "eval_out/")

Modules: ``configs`` (the ``--config`` grammar), ``harness`` (generation and metrics), ``metrics``
(PSNR/SSIM/feature distance/LPIPS, FID/KID), ``video`` (VBench-style dimensions), ``features`` (feature
networks), ``report``/``plots`` (JSON, markdown, PNG), ``regression`` (stored baselines), ``cli``.
Definitions of every metric: docs/eval.md.
"""

from dit_accel.eval.configs import EvalConfig, parse_config, valid_names
from dit_accel.eval.harness import METRIC_GROUPS, EvalSettings, builtin_prompts, evaluate
from dit_accel.eval.report import write_report

__all__ = ["EvalConfig", "EvalSettings", "METRIC_GROUPS", "builtin_prompts", "evaluate", "parse_config", "valid_names", "write_report"]
