"""The bundled demo: a small real-speech parquet set and the tiny-model builders the demo and tests share."""
