"""Decisions from good parts only, measured: thresholds set on a run's held-out good training images (false-alarm
rate 1 %), then the share of unseen good test images flagged (false alarms) and of defective ones flagged (detections).

    python benchmarks/false_alarms.py RUN_DIR      # a run trained by benchmarks/realdata.py or cnc train
"""

import json
import sys

import numpy as np

from cnc_ad.data import scan_dataset
from cnc_ad.data.samples import held_out_by_category, split_calibration
from cnc_ad.deploy import Detector
from cnc_ad.deploy.calibrate import calibrate_detector, score_images
from cnc_ad.runs import RunFolder

run = sys.argv[1]
config = RunFolder(run).read_config()
index = scan_dataset(config.data.root)
_, held = split_calibration(index.train_samples(), config.data.calibration_share, config.data.calibration_min)
detector = Detector.load(run, device="cpu")
found = calibrate_detector(detector, held_out_by_category(held), 0.01, workers=2)
rows = {}
for cat in index.categories:
    tests = index.test_samples(cat)
    scores, _ = score_images(detector, [s.image for s in tests], workers=2)
    labels = np.array([s.label for s in tests])
    t = found.image[cat].value
    rows[cat] = {
        "held_out": found.image[cat].images,
        "threshold": t,
        "rule": found.image[cat].rule,
        "false_alarms": float((scores[labels == 0] >= t).mean()),
        "good": int((labels == 0).sum()),
        "detected": float((scores[labels == 1] >= t).mean()),
        "defective": int((labels == 1).sum()),
    }
    print(cat, json.dumps(rows[cat]), flush=True)
