"""`python -m comfyui_controlnet_core demo [...]`: the pack's command line (only `demo` for now).

ComfyUI never runs this file; it imports nothing heavy until a command is chosen.
"""

from __future__ import annotations

import sys

USAGE = """usage: python -m comfyui_controlnet_core demo [--hint IMAGE [--hint2 IMAGE]] [--prompt TEXT] [--out DIR] ...

commands:
  demo    sample the shipped tiny models with and without Canny control; writes PNGs and a contact sheet
          (`python -m comfyui_controlnet_core demo --help`: every option with its default, how the hint
          image is prepared, and the words the tiny text encoder knows)
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from .controlnet_core.tiny.demo import main as demo_main

        return demo_main(rest)
    print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
