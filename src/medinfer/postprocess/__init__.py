"""medinfer.postprocess"""
