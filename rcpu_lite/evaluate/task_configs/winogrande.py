"""The harness's own winogrande functions, for winogrande.yaml's !function tags (which load a file beside the YAML)."""
from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_choice, doc_to_target, doc_to_text  # noqa: F401
