"""side4video.model"""
