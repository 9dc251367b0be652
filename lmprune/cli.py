"""The `lmprune` command. Exit codes: 0 success, 1 a threshold failed, 2 bad input or usage."""

from __future__ import annotations

import argparse
import json
import sys
import traceback

from lmprune import __version__
from lmprune.core.errors import EXIT_BAD_INPUT, EXIT_OK, describe, redact


def model_info(name: str, revision: str | None = None, trust_remote_code: bool = False) -> dict:
    """Architecture facts from the config alone: the model is built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    from lmprune.core.arch import NeuronMap
    from lmprune.core.models import count_parameters, load_config

    source, config = load_config(name, revision, trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    nmap = NeuronMap(model)
    widths = nmap.widths
    return {
        "model": name,
        "source": source.kind,
        "architecture": type(model).__name__,
        "model_type": config.model_type,
        "num_layers": nmap.num_layers,
        "neurons_per_layer": widths,
        "total_neurons": sum(widths),
        "parameters": count_parameters(model),
        "hook_points": nmap.hook_points,
        "hook": "forward pre-hook: the input of each MLP output projection [batch, pos, d_mlp]",
    }


def cmd_info(args: argparse.Namespace) -> int:
    info = model_info(args.model, args.revision, args.trust_remote_code)
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    widths = info["neurons_per_layer"]
    per_layer = str(widths[0]) if len(set(widths)) == 1 else ", ".join(map(str, widths))
    hooks = info["hook_points"]
    print(f"model             {info['model']} ({info['source']})")
    print(f"architecture      {info['architecture']} (model_type {info['model_type']})")
    print(f"layers            {info['num_layers']}")
    print(f"neurons per layer {per_layer}")
    print(f"total neurons     {info['total_neurons']:,}")
    print(f"parameters        {info['parameters']:,}")
    print(f"hook points       {hooks[0]} ... {hooks[-1]} (input of each, {len(hooks)} in all)")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmprune",
        description="Find the MLP modules of a language model that carry offensive content, "
                    "and remove them.",
    )
    parser.add_argument("--version", action="version", version=f"lmprune {__version__}")
    parser.add_argument("--debug", action="store_true", help="Show tracebacks on errors.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info_help = "Architecture, layers, neurons and hook points of a model."
    info = sub.add_parser("info", help=info_help, description=info_help)
    info.add_argument("model", metavar="MODEL",
                      help="Hub id, local folder, .gguf file or bundled alias (smollm2-135m, "
                           "gemma3-270m).")
    info.add_argument("--json", action="store_true", help="Print a JSON object.")
    info.add_argument("--revision", default=None, help="Hub revision.")
    info.add_argument("--trust-remote-code", action="store_true",
                      help="Run model code from the Hub repository.")
    info.set_defaults(func=cmd_info)
    # one subcommand per registered stage, in flow order, then the recipes that chain them
    from lmprune.compare import register as register_compare
    from lmprune.run.pipeline import register as register_run
    from lmprune.stages import STAGES

    for spec in STAGES.values():
        spec.register(sub)
    register_run(sub)
    register_compare(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Exception as err:  # exit 1 is only a failed gate: anything else is one line, exit 2
        if args.debug:
            print(redact(traceback.format_exc()), end="", file=sys.stderr)
        print(f"lmprune: error: {redact(describe(err))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("lmprune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
