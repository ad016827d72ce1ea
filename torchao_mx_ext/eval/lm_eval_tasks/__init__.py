"""lm-eval task definitions (YAML) over local data files; see ``torchao_mx_ext.eval.lm_eval_runner``.

Use them directly with lm-eval's own CLI (they replace the stock tasks of the same names there)::

    lm_eval --model hf --model_args pretrained=DIR,max_length=2048 --include_path <this folder> \
        --tasks arc_easy,wikitext2 --metadata '{"data_dir": "/path/to/shared/data"}'
"""
