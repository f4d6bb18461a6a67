"""The paper's study, built on the trainer: the experiment registry (`experiments`), run
folders and their discovery (`runs`), papermill orchestration (`reproduce`: the command;
`grid`: slots, queue and claims; `kernels`: notebook processes), GPU-hour estimates
(`estimate`), the information study's shared pieces (`information`), the tables
(`report`) and the figures (`figures`)."""
