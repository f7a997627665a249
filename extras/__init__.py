"""What the paper never had, one idea a file, beside its pipeline at the top level:

    synthetic.py   talking heads drawn from their 68 landmarks: the built-in dataset and exact ground truths
    landmarks.py   automatic 68-point landmarks for own photos and videos (the optional dlib extra), and the
                   plain videos `prepare` takes beside 300VW's folders
    reenact.py     reenact's sources and drivers in every format, retargeting, generation for a whole driver
    speed.py       bench: the step's speed against the device's peak, the fast path against the plain one
    ablation.py    the ablation study over seeds: training every ablation, paired tests, REPORT.md
    play.py        a local page (play.html) to drag a face's landmarks and watch G redraw it, and its server
    cli.py         the command line's plumbing: one-line errors, argparse with suggestions, checked numbers,
                   evaluate's default run and its terminal table

They import data.py (reenact.py, play.py, speed.py and ablation.py also networks.py; reenact.py, play.py and
ablation.py evaluate.py, which imports cli.py, landmarks.py and synthetic.py); data.py and losses.py import
nothing here, and nothing imports facesynth.py.
"""
