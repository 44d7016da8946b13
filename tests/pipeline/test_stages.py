"""The stage graph: prerequisites in order, --only runs what a stage needs, every shipped notebook is a stage."""
import pytest

from nrfm.errors import ConfigError
from nrfm.pipeline.runner import list_notebooks
from nrfm.pipeline.stages import BY_NOTEBOOK, STAGES, prerequisites, with_prerequisites
from nrfm.pipeline.workspace import packaged_notebooks


def test_every_shipped_notebook_is_a_stage_and_needs_only_earlier_ones():
    stems = [p.stem for p in packaged_notebooks()]
    assert sorted(BY_NOTEBOOK) == stems
    for stage in STAGES.values():
        for need in stage.needs:
            assert STAGES[need].notebook < stage.notebook, (stage.name, need)


def test_prerequisites_in_graph_order():
    assert prerequisites("cohort") == []
    assert prerequisites("gradcam") == ["cohort", "pretrain", "finetune"]
    assert prerequisites("summary")[:3] == ["cohort", "pretrain", "finetune"]
    assert set(prerequisites("summary")) == {"cohort", "pretrain", "finetune", "site_invariance", "survival", "gradcam"}
    with pytest.raises(ConfigError, match="unknown stage"):
        prerequisites("nope")


def test_only_runs_the_prerequisites_first():
    available = [p.stem for p in packaged_notebooks()]
    assert with_prerequisites(["05_gradcam"], available) == ["00_cohort", "01_pretrain", "02_finetune_dro", "05_gradcam"]
    assert with_prerequisites(["05_gradcam"], available, completed=["00_cohort.ipynb", "01_pretrain.ipynb",
                                                                      "02_finetune_dro.ipynb"]) == ["05_gradcam"]
    assert [p.stem for p in list_notebooks(["03"])] == ["00_cohort", "01_pretrain", "02_finetune_dro",
                                                        "03_site_embeddings"]
