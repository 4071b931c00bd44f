"""The paper's tables rerun on Fashion-MNIST: four studies, each one command, each a page under docs/results/.

``run_study(name)`` trains a study's grids (skipping finished runs) and rebuilds its page from the run
folders; ``python -m l2bn study NAME`` is its command. Studies: :data:`STUDIES` (``table1``, ``norms``,
``placement``, ``curves``).
"""
from .catalog import STUDIES, Grid, Study, StudyOverrides, estimate_seconds, get_study, list_studies
from .folder import DEFAULT_ROOT, study_command
from .page import SECTIONS, build_index, build_page, load_study_runs
from .run import StudyResult, run_study
from .stats import Difference, compare_groups, detectable_difference, holm

__all__ = [
    "DEFAULT_ROOT", "SECTIONS", "STUDIES", "Difference", "Grid", "Study", "StudyOverrides", "StudyResult",
    "build_index", "build_page", "compare_groups", "detectable_difference", "estimate_seconds", "get_study",
    "holm", "list_studies", "load_study_runs", "run_study", "study_command",
]
