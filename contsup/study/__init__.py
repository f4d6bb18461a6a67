"""The paper's study, built on the trainer: the experiment registry (`experiments`), run
folders and their discovery (`runs`), papermill orchestration (`reproduce`), GPU-hour
estimates (`estimate`), the information study's shared pieces (`information`) and the
tables and figures (`report`)."""
