"""Sub-commands of the `llava-evaclip` CLI; each module defines `add_parser(subparsers)` that sets `func`."""
