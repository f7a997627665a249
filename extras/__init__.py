"""What the paper never had, one idea a file, beside its pipeline at the top level:

    yardsticks.py  the floor beside every score (copy, a thin-plate-spline warp), each pair's motion and its
                   thirds, and the scores beyond L1/PSNR/SSIM (cross-identity truth, the face judge)
    synthetic.py   talking heads drawn from their 68 landmarks: the built-in dataset and exact ground truths
    landmarks.py   automatic 68-point landmarks for own photos and videos (the optional dlib extra), and the
                   plain videos `prepare` takes beside 300VW's folders
    augment.py     --augment: each triplet scaled, turned and shifted as one
    runs.py        a run's life: its folder's lock, resume and --init, its files, signals, torchrun's ranks,
                   fetching VGG-19's weights
    reenact.py     reenact's sources and drivers in every format, retargeting, generation for a whole driver
    speed.py       bench: the step's speed against the device's peak, the fast path against the plain one
    ablation.py    the ablation study over seeds: training every ablation, paired tests, REPORT.md
    play.py        a local page (play.html) to drag a face's landmarks and watch G redraw it, and its server
    cli.py         the command line's plumbing: one-line errors, argparse with suggestions, checked numbers,
                   evaluate's default run, run labels and its terminal table

augment.py imports nothing of the project; the others import data.py (and most networks.py); reenact.py,
play.py and ablation.py import evaluate.py, which imports cli.py and yardsticks.py; data.py and losses.py
import nothing here, networks.py nothing either, and nothing imports facesynth.py.
"""
