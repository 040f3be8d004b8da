"""medinfer.models"""
