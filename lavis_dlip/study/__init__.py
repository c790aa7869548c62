"""DLIP's analysis as one command: ablation grids and a budgeted shape search over one
teacher and one teacher-output cache, with seeds and intervals.

    python -m lavis_dlip.study --cfg-path projects/dlip/study/retrieval.yaml [--parallel N] [--dry-run]

``spec`` reads the study yaml, ``run`` runs what is missing, ``stats`` holds the
bootstrap and paired differences, ``search`` the shape search, ``write`` the report.
"""
