"""A stand-in cell CLI for the executor tests: records its process and when it ran, then exits as told.

    main([record_file, seconds, exit_code])   # exit_code "kill" ends the process the hard way
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path


def main(argv: list[str]) -> None:
    record, seconds, code = Path(argv[0]), float(argv[1]), argv[2]
    start = time.time()
    time.sleep(seconds)
    record.write_text(json.dumps({"pid": os.getpid(), "start": start, "end": time.time()}))
    print(f"probe {record.name} done")
    if code == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if code != "0":
        raise SystemExit(int(code))
