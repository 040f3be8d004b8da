"""medinfer.inference"""
