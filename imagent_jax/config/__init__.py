"""Run configuration: the schema with the embedded default (``schema.get_config``), released-model
presets (``presets.released_qwen_config``) and the checks run before anything compiles
(``validate.validate``)."""
