"""Side-by-side speed and memory measurements of moe-cl's hot paths (``python -m moe_cl.bench``).

Every comparison runs in one process on one machine, its variants interleaved repeat by repeat
(so a burst of load from elsewhere hits all of them alike), after a warm-up; the table shows
medians and the speed-up over each comparison's baseline, and the JSON keeps every sample.

Layout: ``__main__`` (the command line, light: it imports no section, torch or Avalanche before
the arguments are valid), ``runner`` (runs the chosen sections, writes the JSON), ``registry``
(the sections by name, each imported when it runs), ``settings`` (sizes and presets),
``harness`` (timing, CPU-share check, rows and targets), ``report`` (the printed report and the
JSON's header), ``training`` (timed training calls of the epoch, memory and gpu sections) and one
module per section: ``bank``, ``layers``, ``ls``, ``epoch``, ``topk``, ``memory``, ``gpu``.
"""
