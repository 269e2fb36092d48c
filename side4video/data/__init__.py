"""side4video.data"""
