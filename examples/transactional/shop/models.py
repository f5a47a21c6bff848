from django.db import models


class Order(models.Model):
    customer = models.TextField()

    class Meta:
        app_label = "shop"
        db_table = "shop_order"  # created by tasks.create_tables(), in the example's schema
        managed = False
