"""Run configuration: the schema with the embedded default (``schema.get_config``), released
presets and the cross-section checks run before anything compiles."""
