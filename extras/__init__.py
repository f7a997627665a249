"""What the paper never had, one idea a file, beside its pipeline at the top level:

    synthetic.py   talking heads drawn from their 68 landmarks: the built-in dataset and exact ground truths
    landmarks.py   automatic 68-point landmarks for own photos and videos (the optional dlib extra)
    reenact.py     reenact's sources and drivers in every format, retargeting, generation for a whole driver
    speed.py       bench: the step's speed against the device's peak, the fast path against the plain one
    play.py        a local page to drag a face's landmarks and watch G redraw it (play.html is the page)
    cli.py         the command line's plumbing: one-line errors, argparse with suggestions, checked numbers
    figures.py     the drawing kit written by hand (no matplotlib): PNG writer, viridis, labelled tiles, axes
    play.py        a local page (play.html) to drag a face's landmarks and watch G redraw it, and its server

They import data.py (reenact.py, play.py and speed.py also networks.py, reenact.py and play.py evaluate.py);
data.py and losses.py import nothing here, and nothing imports facesynth.py.
"""
