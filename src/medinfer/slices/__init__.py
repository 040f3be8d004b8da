"""medinfer.slices"""
