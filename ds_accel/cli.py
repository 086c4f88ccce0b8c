"""``ds-accel``: the command line. User mistakes print one ``ds-accel: error:`` line (exit 2)."""

from __future__ import annotations

import argparse
import os
import sys

from .config import PACKAGE_CONFIGS, ConfigError, config_path

def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="default",
                   help="YAML/JSON run config, or a bundled one: " + ", ".join(sorted(
                       f.stem for f in PACKAGE_CONFIGS.glob("*.yaml"))) + " (default: default)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config field, e.g. --set run.total_steps=50 (repeatable)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's


def _load(args):
    from . import config

    return config.load(config_path(args.config), args.overrides)


def cmd_train(args) -> int:
    from . import runtime
    from .trainer import train

    cfg = _load(args)
    result = train(cfg, resume=args.resume, stop_after=args.stop_after_steps)
    if runtime.rank() == 0:
        if "stopped_at" in result:
            print(f"stopped at step {result['stopped_at']}; checkpoint in {cfg.run.output_dir}/checkpoints "
                  "(continue with --resume)")
        else:
            print(f"final validation loss {result['val_loss']:.4f} after {result['step']} steps, "
                  f"{result['tokens']:,} tokens, {result['flops']:.3e} FLOPs, {result['wall_s']:.1f} s")
            print(f"outputs: {result['output_dir']} (metrics.jsonl, monitor/, loss.png, checkpoints/"
                  + (", export/" if "export_dir" in result else "") + ")")
    runtime.shutdown()
    return 0


def cmd_prepare_data(args) -> int:
    from .data import prepare

    cfg = _load(args)
    corpus = prepare(cfg.data)
    print(f"tokenizer: {corpus.tokenizer_dir} ({corpus.vocab_size} tokens); "
          f"{len(corpus.train)} training and {len(corpus.val)} validation blocks of {cfg.data.seq_len}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ds-accel", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train (dense, V-cycle and/or SAT) as the config says")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in run.output_dir")
    p.add_argument("--stop-after-steps", type=int, default=None, metavar="N",
                   help="save a checkpoint and exit after global step N (time-limited or preemptible jobs)")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("prepare-data", help="train/load the tokenizer and pack the corpus into the cache")
    _add_config_args(p)
    p.set_defaults(func=cmd_prepare_data)
    from . import bench, gpu_check, launcher, planner, vcycle_study

    for module in (launcher, planner, bench, gpu_check, vcycle_study):
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"ds-accel: error: {err}", file=sys.stderr)
        return 2
    finally:
        sys.stdout.flush()


if __name__ == "__main__":
    code = main()
    os._exit(code)
