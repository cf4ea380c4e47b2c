"""``python tools/convert_checkpoint.py {hf-to-mcore,mcore-to-hf,verify} --model NAME …``.

``--help``, a usage error and an unknown ``--model`` import neither torch nor any model: the
names and summaries come from the catalog (``models/catalog.py``), the model's family from the
registry once the arguments are known.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lov15_megatron.config import ConfigError, validate_world_size
from lov15_megatron.convert.errors import ConversionError
from lov15_megatron.models.catalog import catalog, check_model_name


def _model_help() -> str:
    return "registered models: " + "; ".join(f"{f.name}: {f.summary}" for f in catalog().values())


def _model_arg(parser: argparse.ArgumentParser) -> None:
    # Not argparse choices: an unknown name is one line listing the registered models (exit 2).
    parser.add_argument("--model", required=True, metavar="{" + ",".join(catalog()) + "}",
                        help=_model_help())  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert_checkpoint.py",
        description="Hugging Face <-> Megatron-Core (torch_dist) checkpoint conversion.",
        epilog=_model_help(),
    )
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF directory -> Megatron distributed checkpoint")
    _model_arg(a)
    a.add_argument("--hf-dir", required=True)
    a.add_argument("--save-dir", required=True)
    a.add_argument("--tp", type=int, default=1, help="check that the result loads at this TP")
    a.add_argument("--pp", type=int, default=1, help="check that the result loads at this PP")
    a.add_argument("--ep", type=int, default=1, help="check that the result loads at this EP")
    a.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    b = sub.add_parser("mcore-to-hf", help="Megatron distributed checkpoint -> HF directory")
    _model_arg(b)
    b.add_argument("--load-dir", required=True)
    b.add_argument("--save-dir", required=True)
    b.add_argument("--hf-template", help="HF directory to take config fields, tokenizer and "
                   "expert layout (one by one or fused) from")  # fmt: skip
    b.add_argument("--max-shard-gb", type=float, default=2.0)
    b.add_argument("--overwrite", action="store_true", help="replace a non-empty --save-dir")
    b.add_argument("--min-pixels", type=int, help="processor image budget (default: template's)")
    b.add_argument("--max-pixels", type=int, help="processor image budget (default: template's)")
    b.add_argument("--max-image-side", type=int, help="processor's longest-side cap (px)")
    b.add_argument("--adapter-dir", help="LoRA checkpoint: also write a PEFT adapter "
                   "directory (adapter_config.json, adapter_model.safetensors)")  # fmt: skip
    b.add_argument("--base-dir", help="LoRA checkpoint: its base checkpoint where it is not at "
                   "the path the checkpoint names (moved); must hold the same weights")  # fmt: skip
    c = sub.add_parser("verify", help="compare HF and Megatron logits on the same inputs")
    _model_arg(c)
    c.add_argument("--hf-dir", required=True)
    c.add_argument("--load-dir", required=True)
    c.add_argument("--tp", type=int, default=1)
    c.add_argument("--pp", type=int, default=1)
    c.add_argument("--ep", type=int, default=1, help="expert parallel size (MoE; expert TP 1)")
    c.add_argument("--layouts", nargs="+", metavar="TPxPP[xEP]",
                   help="several layouts in one launch (instead of --tp/--pp/--ep): one JSON "
                   "line each")  # fmt: skip
    c.add_argument("--inputs", help="torch file with a dict holding input_ids [batch, seq] "
                   "(a VLM: also pixel_values/image_grid_thw, pixel_values_videos/"
                   "video_grid_thw)")  # fmt: skip
    c.add_argument("--dump-logits", help="write the Megatron logits (HF vocab) to this file")
    return p


def _check_layout(converter, hf_dir: str, tp: int, pp: int, ep: int) -> None:
    from lov15_megatron.config import config_from_dict, config_to_dict
    from lov15_megatron.convert.converter import parallel_layout
    from lov15_megatron.convert.hf_io import HFCheckpointReader
    from lov15_megatron.verify import world_size

    raw = config_to_dict(converter.run_config(HFCheckpointReader(hf_dir).config, tp, pp))
    raw["parallel"].update(parallel_layout(raw["model"]["language"], tp, pp, ep))
    validate_world_size(
        config_from_dict(raw, source=f"{hf_dir}/config.json"), world_size(tp, pp, ep)
    )


def _image_overrides(args: argparse.Namespace) -> dict[str, int]:
    """The processor image settings given on the command line."""
    given = {
        "min_pixels": args.min_pixels,
        "max_pixels": args.max_pixels,
        "max_image_side": args.max_image_side,
    }
    return {k: v for k, v in given.items() if v is not None}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        check_model_name(args.model)  # an unknown name: one line listing the registered ones
        from lov15_megatron.models.registry import get_family

        family = get_family(args.model)
        if args.command == "verify":
            from lov15_megatron.verify import parse_layout, verify_layouts

            try:
                layouts = [parse_layout(text) for text in args.layouts or []]
            except ValueError as e:
                raise ConfigError(f"--layouts: {e}") from None
            for result in verify_layouts(args.model, args.hf_dir, args.load_dir,
                                         layouts or [(args.tp, args.pp, args.ep)], args.inputs,
                                         args.dump_logits):  # fmt: skip
                print(json.dumps(result))
            return 0
        from lov15_megatron.convert import core
        from lov15_megatron.runtime import distributed

        converter = family
        if args.command == "hf-to-mcore":
            _check_layout(converter, args.hf_dir, args.tp, args.pp, args.ep)
        else:
            from lov15_megatron.convert.hf_io import check_save_dir
            from lov15_megatron.models.lora_export import lora_meta

            sources = [Path(args.load_dir)] + ([Path(args.hf_template)] if args.hf_template else [])
            check_save_dir(Path(args.save_dir), sources, args.overwrite)
            lora = lora_meta(args.load_dir) is not None
            for flag, value in (("--adapter-dir", args.adapter_dir), ("--base-dir", args.base_dir)):
                if value and not lora:
                    raise ConversionError(f"{flag}: {args.load_dir} is not a LoRA checkpoint")
            if args.adapter_dir:
                check_save_dir(Path(args.adapter_dir), [*sources, Path(args.save_dir)],
                               args.overwrite)  # fmt: skip
            image = _image_overrides(args)
        distributed.initialize(core.converter_runtime_config())
        try:
            if args.command == "hf-to-mcore":
                summaries = [core.hf_to_mcore(converter, args.hf_dir, args.save_dir, args.dtype)]
            else:
                shard = int(args.max_shard_gb * 2**30)
                if lora:  # merged weights (+ the PEFT adapter)
                    from lov15_megatron.models.lora_export import export_lora

                    summaries = export_lora(converter, args.load_dir, args.save_dir,
                                            args.hf_template, shard, image, args.adapter_dir,
                                            args.base_dir)  # fmt: skip
                else:
                    summaries = [core.mcore_to_hf(converter, args.load_dir, args.save_dir,
                                                  args.hf_template, shard, image)]  # fmt: skip
        finally:
            distributed.shutdown()
        for summary in summaries:
            print(summary.line())
        return 0
    except (ConversionError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


# python -m lov15_megatron.cli.convert_checkpoint (the quickstart; spawned workers import it)
if __name__ == "__main__":
    sys.exit(main())
