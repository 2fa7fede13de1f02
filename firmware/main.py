# main.py: run the station; on any error print it and reset, so a glitch never stops the board.
import sys
import time

import machine

try:
    import app

    app.main()
except Exception as exc:  # KeyboardInterrupt (Ctrl-C) is not caught: it leaves you at the REPL
    sys.print_exception(exc)
    print("station: resetting in 10 s (Ctrl-C to stop)")
    time.sleep(10)
    machine.reset()
