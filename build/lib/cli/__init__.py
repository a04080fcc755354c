"""The command lines (top layer): ``python -m data_index`` (:mod:`cli.data_index_cmd`) and
``python -m explainer`` (:mod:`cli.explainer_cmd`)."""
