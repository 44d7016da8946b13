"""The cohort table's median overall survival is the Kaplan-Meier median, not the median follow-up time."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from nrfm.data.cohort import cohort_table
from nrfm.config import ENDPOINTS, Config
from nrfm.pipeline.context import RunContext


def _context(tmp_path, days, events, patients=None) -> RunContext:
    n = len(days)
    frame = pd.DataFrame({"subject_id": [f"s{i}" for i in range(n)],
                          "patient_id": patients or [f"p{i}" for i in range(n)], "site": "A",
                          "split": "train", "age": 50.0, "grade": 4.0, "os_days": days, "os_event": events})
    for endpoint in ENDPOINTS:
        frame[endpoint] = np.nan
    return RunContext(config=Config(), run_dir=tmp_path, manifest=frame, cohort_dir=tmp_path)


def test_median_os_is_the_kaplan_meier_median(tmp_path):
    from lifelines import KaplanMeierFitter

    # planted: early deaths, many long censored follow-ups; the plain median of times (400) is far off
    days = [50, 80, 120, 150, 200, 260, 300, 400, 420, 500, 650, 700, 900, 1000, 1200]
    events = [1, 1, 0, 1, 1, 0, 1, 0, 1, 0, 0, 1, 0, 0, 0]
    table = cohort_table(_context(tmp_path, days, events)).set_index("site")
    reference = KaplanMeierFitter().fit(days, events).median_survival_time_  # lifelines, same sample
    assert reference == 700.0 and np.median(days) == 400.0
    assert table.loc["all", "os_median_days"] == pytest.approx(reference)
    assert table.loc["A", "os_median_days"] == pytest.approx(reference)


def test_median_os_not_reached_and_one_row_per_patient(tmp_path):
    table = cohort_table(_context(tmp_path, [100, 200, 300, 400], [1, 0, 0, 0])).set_index("site")
    assert table.loc["all", "os_median_days"] == "not reached"  # survival never drops to 0.5
    # a follow-up exam repeats its patient's survival: counted once
    ctx = _context(tmp_path, [100, 100, 200, 300], [1, 1, 1, 0], patients=["p0", "p0", "p1", "p2"])
    assert cohort_table(ctx).set_index("site").loc["all", "os_median_days"] == pytest.approx(200.0)
