"""Benchmarks: `colocate bench transport` (and, later, `colocate bench train`)."""

import argparse

_BENCHES = {"transport": "colocate.bench.transport", "train": "colocate.bench.train"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    import importlib

    sub = p.add_subparsers(dest="bench", required=True)
    for name, module_name in _BENCHES.items():
        module = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=module.__doc__.splitlines()[0],
                                            description=module.__doc__,
                                            formatter_class=argparse.RawDescriptionHelpFormatter))


def main(args: argparse.Namespace) -> int:
    import importlib

    return importlib.import_module(_BENCHES[args.bench]).main(args)
