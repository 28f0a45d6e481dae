"""The `moecompress` command's entry point, outside the package: importing `moecompress` loads torch and
transformers for seconds, and a Ctrl-C then must end like one during the work (one line, status 130), not as a
traceback. Nothing heavy is imported before the handler is in place."""

import sys


def main() -> None:
    try:
        from moecompress.cli import main as run

        code = run()
    except KeyboardInterrupt:
        print("error: interrupted while starting; nothing was written.", file=sys.stderr)
        code = 130
    sys.exit(code)
