"""`nin summary` and `nin models`: the networks, their shapes, parameters and FLOPs, and the shipped weights."""
from __future__ import annotations

import argparse

from ..errors import UsageError
from .common import number


# --- inspecting ---------------------------------------------------------------------------
def cmd_summary(args: argparse.Namespace) -> int:
    import json

    from ..api import summary

    kwargs = {}
    if args.model_kwargs is not None:
        try:
            kwargs = json.loads(args.model_kwargs)
        except ValueError:
            kwargs = None
        if not isinstance(kwargs, dict):
            raise UsageError(f"--model-kwargs must be a JSON object, e.g. '{{\"width\": 64}}', got {args.model_kwargs!r}")
    try:
        table = summary(args.model, tuple(args.input_size) if args.input_size else None, batch_size=args.batch_size,
                        **kwargs)
    except UsageError as e:  # the API's wording names keyword arguments; here they are one option
        raise UsageError(str(e).replace("model arguments", "--model-kwargs")) from None
    print(table)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from ..models import list_models, model_info
    from ..hub import list_pretrained, pretrained_info

    print(f"{'model':<14} {'input':<12} {'params':>11} {'GFLOPs':>8}")
    for name in list_models():
        info = model_info(name)
        size = "x".join(map(str, info.input_size))
        print(f"{name:<14} {size:<12} {info.params:>11,} {info.flops / 1e9:>8.3f}")
    names = list_pretrained()
    if names:
        print("\nshipped weights (nin predict/eval/cam/export/serve NAME; create_model(..., pretrained=True)):")
        print(f"{'name':<32} {'params':>9} {'size':>8} {'test acc':>9} {'with its TTA':>16}  made by")
        for n in names:
            e = pretrained_info(n)
            acc = e["accuracy"]["fp32"]
            mark = " *" if e.get("default") else ""
            own = f"{acc[e['tta']]:.4f} ({e['tta']})" if e["tta"] != "none" else "-"
            print(f"{n + mark:<32} {e['params']:>9,} {e['bytes'] / 1e6:>6.2f}MB {acc['none']:>9.4f} "
                  f"{own:>16}  {e['command']}")
        print("* the architecture's default weights; accuracy on the 10,000 Fashion-MNIST test images, fp32; "
              "its TTA is what nin eval/predict/serve use unless --tta says otherwise")
    return 0


def _add_inspect(sub) -> None:
    p = sub.add_parser("summary", help="per-layer output shapes, parameters and FLOPs of a model")
    p.add_argument("model", metavar="MODEL",
                   help="a registered model name, shipped weights, a run folder or a .safetensors (see `nin models`)")
    p.add_argument("--model-kwargs", metavar="JSON",
                   help="arguments of a registered model name as a JSON object, e.g. '{\"width\": 64}' (saved "
                        "weights fix their own)")
    p.add_argument("--input-size", type=number(int, 1, 1 << 20), nargs=3, metavar=("C", "H", "W"),
                   help="input size (default: the model's own)")
    p.add_argument("--batch-size", type=number(int, 1, 1 << 20), default=1,
                   help="batch size shown in the shapes (default 1)")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("models", help="list the registered models with input size, parameters, FLOPs")
    p.set_defaults(func=cmd_models)
